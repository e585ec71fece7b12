"""`align dpo` under `accelerate launch` with 2 CPU processes (DDP over gloo): same result shape as
one process, files written once by the main process, reference log-probs equal to one process's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, accelerate_2proc, read_jsonl

pytestmark = pytest.mark.slow


def test_two_cpu_processes(tiny_model, demo_data, tmp_path):
    import datasets
    from safetensors.torch import load_file

    from align.core.config import parse_config
    from align.core.stage_dir import Stage
    from align.stages.dpo import DPOConfig, build_trainer

    head = tmp_path / "pairs.jsonl"
    head.write_text("".join((demo_data / "pairs.jsonl").read_text().splitlines(keepends=True)[:48]))
    out = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        head,
        "--max_steps",
        4,
        "--logging_steps",
        2,
        "--per_device_train_batch_size",
        4,
        "--max_length",
        64,
        "--learning_rate",
        "1e-4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *accelerate_2proc(),
            "-m",
            "align",
            "dpo",
            *map(str, flags),
            "--output_dir",
            str(out),
            "--ref_cache_dir",
            str(tmp_path / "cache"),
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
    assert record["status"] == "complete" and s["num_processes"] == 2 and s["global_step"] == 4
    assert s["train_pairs"] == 48 and s["ref_logps"] == "computed"
    assert s["ref_precompute_batches"] == 6  # 12 batches of 4 pairs, half on the main process
    assert 0.0 <= s["reward_accuracy"] <= 1.0 and s["final_loss"] > 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # logged once, not once per process
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "chat_template.jinja").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "metrics.jsonl", "model", "stage.json"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # The reference log-probs gathered from 2 processes equal one process's, in dataset order.
    cfg = parse_config(
        DPOConfig,
        [*map(str, flags), "--output_dir", str(tmp_path / "one"), "--ref_cache_dir", str(tmp_path / "cache1")],
    )
    from align.training.data import load_rows

    train = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(str(head), "preference")]
    )
    single = build_trainer(cfg, train, Stage("dpo", cfg, cfg.output_dir))
    assert single.ref_cache.path.name == Path(s["ref_cache_file"]).name  # same key from either launch
    two = load_file(s["ref_cache_file"])
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(two[column], torch.tensor(single.train_dataset[column]), atol=1e-5, rtol=0)
