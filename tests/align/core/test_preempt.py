"""Preemption: SIGTERM/SIGUSR1 to a real `align` process -> a checkpoint, exit code 3, and a rerun that continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from align.cli import main
from align.core import preempt
from align.core.errors import EXIT_INTERRUPTED
from align.core.stage_dir import shard_files
from align.training.evaluation import load_prompts

from conftest import ALIGN, ROOT, read_jsonl, run_align

STOP_WITHIN = 120  # seconds from the signal to the exit: one step / iteration / shard, plus the checkpoint


def start(args: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([*ALIGN, *map(str, args)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def signal_when(proc: subprocess.Popen, log: Path, ready, sig: int, timeout: float = 600) -> None:
    """Send ``sig`` once ``ready()`` holds (the run is past its start), then wait for the exit."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the run did not get going in time"
        time.sleep(0.05)
    sent = time.time()
    os.kill(proc.pid, sig)
    proc.wait(timeout=STOP_WITHIN)
    assert time.time() - sent < STOP_WITHIN


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl")] if (out / "metrics.jsonl").is_file() else []


def last_line(log: Path) -> str:
    return [line for line in log.read_text().splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_sigterm_stops_sft_at_a_checkpoint_and_resume_continues_from_it(tiny_model, demo_data, tmp_path):
    out, log, steps = tmp_path / "sft", tmp_path / "sft.log", 60
    data, rows = tmp_path / "sft.jsonl", (demo_data / "sft.jsonl").read_text()
    data.write_text(rows)
    args = [
        "sft",
        "--config",
        ROOT / "configs" / "demo_sft.yaml",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--max_steps",
        steps,
        "--save_steps",
        1000,
        "--logging_steps",
        2,
        "--per_device_train_batch_size",
        16,
    ]
    proc = start(args, log)
    signal_when(proc, log, lambda: len(logged_steps(out)) >= 2, signal.SIGTERM)

    assert proc.returncode == EXIT_INTERRUPTED, log.read_text()[-3000:]
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1  # save_steps is far away: this is the preemption checkpoint
    stopped = int(ckpts[0].name.split("-")[1])
    assert 4 <= stopped < steps and (ckpts[0] / "optimizer.pt").is_file()
    assert last_line(log) == (
        f"align sft: interrupted: stopped by SIGTERM at step {stopped}/{steps}; checkpoint {ckpts[0]}"
        " written; rerun the same command with --resume to continue"
    )
    assert not (out / "stage.json").exists() and not (out / "model").exists()

    # the checkpoint records the inputs it was trained on: a resume on another dataset is refused
    data.write_text(rows.replace('"content": "1', '"content": "2', 1))
    changed = run_align(*args, "--resume", timeout=300)
    assert changed.returncode == 2 and changed.stderr.strip() == (
        f"align sft: error: {out} already holds an unfinished 'sft' run with changed inputs (dataset ({data}) content"
        " changed since the unfinished run); pass --overwrite to replace it or choose another --output_dir"
    )
    assert sorted((out / "checkpoints").glob("checkpoint-*")) == ckpts
    data.write_text(rows)  # the same content again (a new mtime): the resume goes on

    again = run_align(*args, "--resume", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["resumed_from_step"] == stopped and summary["global_step"] == steps
    loss_steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert loss_steps == list(range(2, steps + 1, 2))  # no step lost or logged twice


def trainer_args(kind: str, tiny_model: Path, demo_data: Path, out: Path, steps: int) -> list:
    """`align rm|dpo|distill` on the demo task for ``steps`` steps, checkpoints far away."""
    data = {
        "rm": ["--dataset", demo_data / "pairs.jsonl", "--eval_split", 0.0],
        "dpo": ["--dataset", demo_data / "pairs.jsonl"],
        "distill": [
            "--dataset",
            demo_data / "sft.jsonl",
            "--teacher",
            tiny_model,
            "--lmbda",
            0.5,
            "--eval_dataset",
            demo_data / "test.jsonl",
            "--eval_max_prompts",
            8,
        ],
    }[kind]
    return [
        kind,
        "--config",
        ROOT / "configs" / f"demo_{kind}.yaml",
        "--model_name_or_path",
        tiny_model,
        *data,
        "--output_dir",
        out,
        "--max_steps",
        steps,
        "--save_steps",
        1000,
        "--logging_steps",
        2,
        "--per_device_train_batch_size",
        8,
        "--max_length",
        64,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rm", "dpo", "distill"])
def test_sigterm_stops_every_trainer_at_a_checkpoint_and_resume_continues(kind, tiny_model, demo_data, tmp_path):
    """The other trainer stages share sft's safe point (the step end): each stops there with a
    checkpoint and exit 3, and its resume ends the run with no step lost or logged twice."""
    out, log, steps = tmp_path / kind, tmp_path / f"{kind}.log", 40
    args = trainer_args(kind, tiny_model, demo_data, out, steps)
    proc = start(args, log)
    signal_when(proc, log, lambda: len(logged_steps(out)) >= 2, signal.SIGTERM)

    assert proc.returncode == EXIT_INTERRUPTED, log.read_text()[-3000:]
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1
    stopped = int(ckpts[0].name.split("-")[1])
    assert 4 <= stopped < steps and (ckpts[0] / "trainer_state.json").is_file()
    assert last_line(log) == (
        f"align {kind}: interrupted: stopped by SIGTERM at step {stopped}/{steps}; checkpoint"
        f" {ckpts[0]} written; rerun the same command with --resume to continue"
    )
    assert not (out / "stage.json").exists() and not (out / "model").exists()

    again = run_align(*args, "--resume", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["resumed_from_step"] == stopped and summary["global_step"] == steps
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(2, steps + 1, 2))


@pytest.mark.parametrize("kind", ["merge", "select", "import-model", "eval"])
def test_a_command_without_a_safe_point_finishes_then_exits_3_and_its_rerun_is_a_no_op(
    kind, tiny_model, demo_data, tmp_path, capsys
):
    """merge, select, import-model and eval have no point to stop at short of the end: a stop
    signal during one lets it finish (its stage dir whole), then exits 3 so a scheduler or
    `align run` (which runs each stage as such a command) stops the pipeline there; the rerun
    finds the stage up to date (import-model, a plain command, writes the same folder again)."""
    out = tmp_path / kind
    argv = {
        "merge": ["merge", "--models", f"{tiny_model},{tiny_model}", "--output_dir", out],
        "select": [
            "select",
            "--candidates",
            fake_eval(tmp_path, tiny_model),
            "--metric",
            "mean_reward",
            "--output_dir",
            out,
        ],
        "import-model": ["import-model", "minilm", out],
        "eval": [
            "eval",
            "--model_name_or_path",
            tiny_model,
            "--dataset",
            demo_data / "test.jsonl",
            "--max_prompts",
            4,
            "--max_tokens",
            4,
            "--engine",
            "transformers",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            out,
        ],
    }[kind]
    argv = [str(a) for a in argv]
    code, err = in_process_with_a_stop(argv, capsys)
    assert code == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == (
        f"align {kind}: interrupted: SIGTERM received; the command finished first, a rerun is a no-op"
    )
    if kind == "import-model":  # a plain command: its folder, written whole, is the result
        files = {p.name: p.read_bytes() for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert main(argv) == 0
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files
        return
    record = json.loads((out / "stage.json").read_text())
    assert record["status"] == "complete" and record["outputs"]
    before = (out / "stage.json").read_bytes()
    assert main(argv) == 0
    assert (out / "stage.json").read_bytes() == before  # up to date: nothing redone


def fake_eval(root: Path, model: Path) -> Path:
    """A finished eval stage dir of ``model``, as `align select` reads it."""
    stage = root / "eval_a"
    stage.mkdir()
    (stage / "stage.json").write_text(
        json.dumps(
            {
                "stage": "eval",
                "status": "complete",
                "artifacts": {},
                "summary": {"mean_reward": 0.5, "num_prompts": 4},
                "config": {"model_name_or_path": str(model)},
            }
        )
    )
    return stage


def in_process_with_a_stop(argv: list[str], capsys, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """``main(argv)`` with ``sig`` already received when it starts (a signal that arrives during
    a command with no safe point acts the same: the handler only records it); (exit code, stderr)."""
    before = {signum: signal.getsignal(signum) for signum in preempt.SIGNALS}
    capsys.readouterr()
    try:
        assert preempt.install() and not preempt.requested()
        os.kill(os.getpid(), sig)
        code = main(argv)
    finally:
        preempt.reset()
        for signum, handler in before.items():
            signal.signal(signum, handler)
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_sigusr1_stops_rlhf_after_the_iteration_and_resume_continues(tiny_model, demo_data, tmp_path):
    out, log, iterations = tmp_path / "rl", tmp_path / "rl.log", 40
    args = [
        "rlhf",
        "--config",
        ROOT / "configs" / "demo_rlhf.yaml",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        out,
        "--num_iterations",
        iterations,
        "--save_every",
        1000,
        "--prompts_per_iteration",
        8,
        "--num_samples",
        4,
        "--kv_cache_gb",
        0.25,
    ]
    proc = start(args, log)
    signal_when(proc, log, lambda: len(logged_steps(out)) >= 2, signal.SIGUSR1)

    assert proc.returncode == EXIT_INTERRUPTED, log.read_text()[-3000:]
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.pt").is_file()
    stopped = int(ckpts[0].name.split("-")[1])
    assert 2 <= stopped < iterations and logged_steps(out) == list(range(1, stopped + 1))
    assert last_line(log) == (
        f"align rlhf: interrupted: stopped by SIGUSR1 after iteration {stopped}/{iterations};"
        f" checkpoint {ckpts[0]} written; rerun the same command with --resume to continue"
    )
    assert not (out / "stage.json").exists() and not (out / "model").exists()

    again = run_align(*args, "--resume", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["resumed_from_iteration"] == stopped
    assert logged_steps(out) == list(range(1, iterations + 1))  # no iteration lost or run twice


@pytest.mark.slow
def test_sigterm_stops_rs_after_a_shard_and_the_rerun_completes(tiny_model, demo_data, tmp_path):
    out, log, n, shard = tmp_path / "rs", tmp_path / "rs.log", 96, 8
    prompts, rows = tmp_path / "prompts.jsonl", (demo_data / "prompts.jsonl").read_text()
    prompts.write_text(rows)
    args = [
        "rs",
        "--config",
        ROOT / "configs" / "demo_rs.yaml",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        prompts,
        "--output_dir",
        out,
        "--max_prompts",
        n,
        "--shard_size",
        shard,
        "--min_reward",
        "null",
        "--reward",
        "rs_scorers:slow_arithmetic",
        "--engine",
        "vllm",
        "--kv_cache_gb",
        0.25,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(ROOT / "tests" / "usercode")]),
    }
    proc = start(args, log, env)
    signal_when(proc, log, lambda: len(shard_files(out)) >= 1, signal.SIGTERM)

    assert proc.returncode == EXIT_INTERRUPTED, log.read_text()[-3000:]
    kept = len(shard_files(out))
    assert 1 <= kept < n // shard and not (out / "stage.json").exists() and not (out / "data").exists()
    assert last_line(log) == (
        f"align rs: interrupted: stopped by SIGTERM after shard {kept}/{n // shard}; {kept} shards"
        f" kept in {out / 'shards'}; rerun the same command to continue"
    )

    # the shard manifest records the inputs: a rerun on other prompts is refused, not mixed in
    assert json.loads((out / "shards" / "manifest.json").read_text())["inputs"]["dataset"].startswith("sha256:")
    first, second, *rest = rows.splitlines(keepends=True)
    prompts.write_text("".join([second, first, *rest]))  # two prompts swapped
    changed = subprocess.run([*ALIGN, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and changed.stderr.strip() == (
        f"align rs: error: {out} already holds an unfinished 'rs' run with changed inputs (dataset ({prompts}) content"
        " changed since the unfinished run); pass --overwrite to replace it or choose another --output_dir"
    )
    assert len(shard_files(out)) == kept
    prompts.write_text(rows)

    again = subprocess.run([*ALIGN, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["resumed_shards"] == kept and summary["prompts"] == n
    ids = [r["prompt_id"] for r in load_prompts(str(demo_data / "prompts.jsonl"), n)]
    table = read_jsonl(out / "candidates.jsonl")
    assert [t["prompt_id"] for t in table[::8]] == ids and len(table) == 8 * n  # none lost, none twice


def test_a_signal_after_the_last_safe_point_still_exits_3(tmp_path, capsys):
    """A stop that comes too late to cut a command short (here: before it starts, in-process) lets it
    finish, then exits 3 so a wrapper stops the pipeline there; the finished stage stays whole."""
    code, err = in_process_with_a_stop(["make-tiny-model", str(tmp_path / "tiny")], capsys, signal.SIGUSR1)
    assert code == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == (
        "align make-tiny-model: interrupted: SIGUSR1 received; the command finished first, a rerun is a no-op"
    )
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
