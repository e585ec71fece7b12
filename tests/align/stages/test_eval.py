"""`align eval`: greedy and sampled evaluation, the figure every stage reports."""

from __future__ import annotations

import json

import pytest

from align.cli import main
from align.core.config import parse_config
from align.stages.eval import EvalConfig, run_eval

from conftest import read_jsonl, run_align


def eval_config(model, data, out, *extra) -> EvalConfig:
    return parse_config(
        EvalConfig,
        [
            "--model_name_or_path",
            str(model),
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--reward",
            "rule:arithmetic",
            "--max_tokens",
            "8",
            *map(str, extra),
        ],
    )


@pytest.mark.slow
def test_greedy_eval_is_exact_match_accuracy_and_matches_the_sft_stage(sft_vllm, sft_run, demo_data, tmp_path):
    record = run_eval(eval_config(sft_run / "model", demo_data / "test.jsonl", tmp_path / "e"), engine=sft_vllm)
    results = read_jsonl(tmp_path / "e" / "eval.jsonl")
    answers = {
        json.loads(line)["prompt_id"]: json.loads(line)["answer"]
        for line in (demo_data / "test.jsonl").read_text().splitlines()
    }
    assert len(results) == 200 and [r["prompt_id"] for r in results] == list(answers)
    assert all(r["reward"] == float(r["response"].strip() == answers[r["prompt_id"]]) for r in results)
    s = record["summary"]
    assert s["mean_reward"] == pytest.approx(sum(r["reward"] for r in results) / 200)
    assert (s["num_prompts"], s["num_samples"]) == (200, 1) and s["tokens_per_s"] > 0
    # The SFT stage evaluated the same test set greedily with the transformers engine.
    sft_summary = json.loads((sft_run / "stage.json").read_text())["summary"]
    assert s["mean_reward"] == pytest.approx(sft_summary["eval_mean_reward"], abs=0.011)


@pytest.mark.slow
def test_sampled_eval_reports_best_of_k(sft_vllm, sft_model, demo_data, tmp_path):
    record = run_eval(
        eval_config(
            sft_model,
            demo_data / "test.jsonl",
            tmp_path / "e",
            "--num_samples",
            4,
            "--temperature",
            1.0,
            "--max_prompts",
            50,
        ),
        engine=sft_vllm,
    )
    results = read_jsonl(tmp_path / "e" / "eval.jsonl")
    assert len(results) == 50 and all(len(r["responses"]) == len(r["rewards"]) == 4 for r in results)
    s = record["summary"]
    every = [x for r in results for x in r["rewards"]]
    assert s["mean_reward"] == pytest.approx(sum(every) / 200)
    assert s["best_of_k"] == pytest.approx(sum(max(r["rewards"]) for r in results) / 50)
    assert s["best_of_k"] > s["mean_reward"]
    reasons = [x for r in results for x in r["finish_reasons"]]
    assert s["truncated_frac"] == sum(x == "length" for x in reasons) / 200 and set(reasons) <= {"stop", "length"}


@pytest.mark.slow
def test_cli_eval_with_the_transformers_engine(sft_model, demo_data, tmp_path):
    out = tmp_path / "cli"
    args = [
        "eval",
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        out,
        "--reward",
        "rule:arithmetic",
        "--max_tokens",
        8,
        "--max_prompts",
        32,
        "--engine",
        "transformers",
    ]
    proc = run_align(*args, check=True)
    stage = json.loads((out / "stage.json").read_text())
    assert stage["stage"] == "eval" and stage["config"]["engine"] == "transformers"
    acc = sum(r["reward"] for r in read_jsonl(out / "eval.jsonl")) / 32
    assert stage["summary"]["mean_reward"] == pytest.approx(acc)
    assert f"eval: mean reward {acc:.4f} on 32 prompts" in proc.stdout
    assert run_align(*args, check=True).returncode == 0  # rerun: no-op
    assert json.loads((out / "stage.json").read_text())["finished_at"] == stage["finished_at"]


def test_sampled_eval_needs_a_temperature(capsys, tmp_path):
    code = main(
        [
            "eval",
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--output_dir",
            str(tmp_path / "o"),
            "--reward",
            "rule:arithmetic",
            "--num_samples",
            "4",
        ]
    )
    assert code == 2 and "num_samples=4 needs --temperature > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
