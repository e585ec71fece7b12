"""`align rlhf` under `accelerate launch` with 2 CPU processes: an engine per rank, each sampling
its shard of the prompt batch, gradients averaged, metrics gathered and files written once."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT, accelerate_2proc, read_jsonl


def test_two_cpu_processes(sft_model, demo_data, tmp_path):
    out = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "prompts.jsonl",
        "--reward",
        "rule:arithmetic",
        "--optimizer",
        "rloo",
        "--num_iterations",
        4,
        "--prompts_per_iteration",
        8,
        "--num_samples",
        4,
        "--max_tokens",
        8,
        "--max_model_len",
        64,
        "--kv_cache_gb",
        0.25,
        "--learning_rate",
        "3e-4",
        "--save_every",
        2,
        "--output_dir",
        out,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *accelerate_2proc(),
            "-m",
            "align",
            "rlhf",
            *map(str, flags),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    record = json.loads((out / "stage.json").read_text())
    s = record["summary"]
    assert record["status"] == "complete" and s["num_processes"] == 2 and s["iterations"] == 4
    assert s["replica_weight_gap"] == 0.0  # both ranks took the same averaged steps
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # logged once, by the main process
    # each row covers both shards: 8 prompts x K=4 samples, rewards of the arithmetic rule in [0, 1]
    assert all(r["samples"] == 32 and 0.0 <= r["reward_mean"] <= 1.0 and r["grad_norm"] > 0 for r in rows)
    assert all((r["truncated_frac"] * 32).is_integer() and 0.0 <= r["truncated_frac"] <= 1.0 for r in rows)
    assert s["truncated_frac_last_10pct"] == rows[-1]["truncated_frac"]  # 4 iterations: the last tenth is the last one
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model", "reward.png", "stage.json"]
    assert (out / "model" / "model.safetensors").is_file()


def test_batch_must_split_evenly(sft_model, demo_data, tmp_path, monkeypatch, capsys):
    """Checked before anything is written (in-process, as rank 0 of 2: no launch needed)."""
    from align.cli import main
    from align.rl import parallel

    monkeypatch.setattr(parallel, "init", lambda device: (0, 2))
    code = main(
        [
            "rlhf",
            "--model_name_or_path",
            str(sft_model),
            "--dataset",
            str(demo_data / "prompts.jsonl"),
            "--reward",
            "rule:arithmetic",
            "--prompts_per_iteration",
            "7",
            "--output_dir",
            str(tmp_path / "odd"),
        ]
    )
    assert code == 2
    assert "'prompts_per_iteration' (7) must be a multiple of the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()
