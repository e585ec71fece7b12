"""`align sft` end to end through the CLI: output contract, accuracy, no-op reruns, crash + resume, LoRA."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ALIGN, ROOT, SFT_FLAGS, SFT_STEPS, read_jsonl, run_align

pytestmark = pytest.mark.slow  # every test trains


def test_sft_output_contract_and_accuracy(sft_run, demo_data):
    record = json.loads((sft_run / "stage.json").read_text())
    assert record["stage"] == "sft" and record["status"] == "complete"
    budget = record["config"]["max_steps"]
    assert budget == SFT_STEPS and record["config"]["learning_rate"] == 2e-3
    assert record["config"]["dataset"] == str(demo_data / "sft.jsonl")
    summary = record["summary"]
    assert summary["global_step"] == budget and summary["train_rows"] == 9800
    # A random model answers none of the held-out sums; the trained one answers some. How many
    # depends on the CPU (conftest's SFT_STEPS); the later stages' tests assert gains over it.
    assert summary["eval_prompts"] == 200
    assert summary["eval_mean_reward"] > 0, summary
    for key in ("torch", "transformers", "trl", "peft", "datasets", "align"):
        assert record["versions"][key]
    assert record["started_at"] <= record["finished_at"]
    assert record["artifacts"]["model"] == str(sft_run / "model")

    rows = read_jsonl(sft_run / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == budget
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])

    results = read_jsonl(sft_run / "eval.jsonl")
    assert len(results) == 200
    assert sum(r["reward"] for r in results) / 200 == pytest.approx(summary["eval_mean_reward"])
    assert all(r["reward"] == float(r["response"].strip() == str(eval(r["prompt"][:-1]))) for r in results)

    assert (sft_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (sft_run / "checkpoints").exists()  # removed after success unless --keep_checkpoints


def test_sft_model_folder_loads_in_transformers(sft_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in sft_model.iterdir()}
    assert {"model.safetensors", "config.json", "chat_template.jinja", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    tok = AutoTokenizer.from_pretrained(sft_model)
    model = AutoModelForCausalLM.from_pretrained(sft_model)
    text = tok.apply_chat_template([{"role": "user", "content": "12+30="}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>12+30=<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_rerun_same_config_is_noop_and_different_config_fails(sft_run, tiny_model, demo_data):
    before = (sft_run / "stage.json").read_text()
    budget = json.loads(before)["config"]["max_steps"]
    args = [
        "sft",
        "--config",
        ROOT / "configs" / "demo_sft.yaml",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        sft_run,
        "--max_steps",
        budget,
        *SFT_FLAGS,
    ]
    started = time.time()
    proc = run_align(*args)
    assert proc.returncode == 0, proc.stderr
    assert (sft_run / "stage.json").read_text() == before
    assert time.time() - started < 60  # no training happened
    proc = run_align(*args, "--max_steps", budget + 1)
    assert proc.returncode == 2
    assert (
        f"{sft_run} already holds a finished 'sft' stage with a different config (max_steps: {budget} -> {budget + 1})"
        in proc.stderr
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.2)


def test_kill_then_resume_continues_from_checkpoint(tmp_path, tiny_model, demo_data):
    out = tmp_path / "sft"
    args = [
        "sft",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--output_dir",
        out,
        "--max_steps",
        "160",
        "--save_steps",
        "40",
        "--logging_steps",
        "10",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "32",
        "--max_length",
        "64",
    ]
    proc = subprocess.Popen(
        [*ALIGN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    # Kill -9 once the step-80 checkpoint is complete (trainer_state.json is written last).
    _wait_for(out / "checkpoints" / "checkpoint-80" / "trainer_state.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stage.json").exists() and not (out / "model").exists()

    plain = run_align(*args)
    assert plain.returncode == 2 and "holds an unfinished run" in plain.stderr and "--resume" in plain.stderr

    resumed = run_align(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "stage.json").read_text())
    assert record["summary"]["resumed_from_step"] >= 80
    assert record["summary"]["global_step"] == 160
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(10, 161, 10))  # every step logged exactly once across the crash


def test_lora_writes_adapter_and_merged_model(tmp_path, tiny_model, demo_data):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    run_align(
        "sft",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--output_dir",
        out,
        "--max_steps",
        "20",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "16",
        "--max_length",
        "64",
        "--use_lora",
        "--lora_r",
        "8",
        "--merge_lora",
        check=True,
    )
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    merged = load_file(out / "model" / "model.safetensors")
    base = load_file(Path(tiny_model) / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no lora_ or base_layer names
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any("q_proj" in k for k in changed) and not any("embed_tokens" in k for k in changed)


def test_qlora_trains_in_4bit(tmp_path, tiny_model, demo_data):
    out = tmp_path / "qlora"
    run_align(
        "sft",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--output_dir",
        out,
        "--max_steps",
        "10",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "16",
        "--max_length",
        "64",
        "--load_in_4bit",
        "--logging_steps",
        "2",
        check=True,
    )
    record = json.loads((out / "stage.json").read_text())
    assert record["summary"]["global_step"] == 10
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "model").exists()
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses  # the 4-bit run learns


def test_quickstart_config_reaches_its_figure(quickstart_sft_run):
    """configs/demo_sft.yaml as the README's quickstart runs it: the held-out figure it quotes."""
    s = json.loads((quickstart_sft_run / "stage.json").read_text())["summary"]
    assert s["global_step"] == 1800 and s["eval_prompts"] == 200
    assert s["eval_mean_reward"] >= 0.9  # exact match on held-out sums; 0.995 seen
