"""`align rs --shard I/N` in separate processes, then `--merge`: exactly the unsharded run's output."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest

from align.cli import main
from align.core.config import parse_config
from align.stages.rs import RSConfig, in_shard, run_rs
from align.training.evaluation import load_prompts

from conftest import ALIGN, ROOT, read_jsonl

N_PROMPTS, PARTS = 48, 3


def rs_flags(sft_model: Path, demo_data: Path, out: Path, *extra) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "demo_rs.yaml"),
        "--model_name_or_path",
        str(sft_model),
        "--dataset",
        str(demo_data / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--max_prompts",
        str(N_PROMPTS),
        "--shard_size",
        "8",
        "--kv_cache_gb",
        "0.25",
        "--engine",
        "vllm",
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def parts(sft_model, demo_data, tmp_path_factory) -> list[Path]:
    """Three `align rs --shard I/3` processes, run side by side as a Slurm array would."""
    root = tmp_path_factory.mktemp("rs_parts")
    dirs = [root / f"part{i}" for i in range(PARTS)]
    procs = [
        subprocess.Popen(
            [*ALIGN, "rs", *rs_flags(sft_model, demo_data, d, "--shard", f"{i}/{PARTS}")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, d in enumerate(dirs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
    return dirs


@pytest.mark.slow
def test_three_parts_merged_equal_the_unsharded_run(parts, sft_vllm, sft_model, demo_data, tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(str(demo_data / "prompts.jsonl"), N_PROMPTS)]
    sizes = []
    for i, part in enumerate(parts):
        record = json.loads((part / "stage.json").read_text())
        table = read_jsonl(part / "candidates.jsonl")
        mine = [pid for pid in ids if in_shard(pid, i, PARTS)]
        assert record["config"]["shard"] == f"{i}/{PARTS}" and record["summary"]["prompts"] == len(mine)
        assert [t["prompt_id"] for t in table[::8]] == mine  # its own prompts only, in dataset order
        sizes.append(len(mine))
    assert sum(sizes) == N_PROMPTS and min(sizes) > 0

    merged = tmp_path / "merged"
    code = main(["rs", *rs_flags(sft_model, demo_data, merged, "--merge", ",".join(map(str, parts[::-1])))])
    assert code == 0
    whole = tmp_path / "whole"
    unsharded = run_rs(parse_config(RSConfig, rs_flags(sft_model, demo_data, whole)), engine=sft_vllm)

    assert read_jsonl(merged / "candidates.jsonl") == read_jsonl(whole / "candidates.jsonl")
    rows = datasets.load_from_disk(str(merged / "data")).to_list()
    assert rows == datasets.load_from_disk(str(whole / "data")).to_list()
    assert 0 < len(rows) < N_PROMPTS  # demo_rs.yaml keeps correct answers only: some prompts drop out
    record = json.loads((merged / "stage.json").read_text())
    for key in (
        "prompts",
        "candidates",
        "distinct_candidates",
        "kept_rows",
        "mean_reward",
        "mean_best_reward",
        "truncated_frac",
        "tokens",
    ):
        assert record["summary"][key] == unsharded["summary"][key], key
    assert record["summary"]["merged_parts"] == PARTS and record["config"]["shard"] is None
    # The merged dir has the unsharded run's identity: that run into it is a no-op, and so is the merge again.
    assert (
        run_rs(parse_config(RSConfig, rs_flags(sft_model, demo_data, merged)), engine=sft_vllm)["finished_at"]
        == record["finished_at"]
    )


@pytest.fixture()
def merge_cli(parts, sft_model, demo_data, tmp_path, capsys):
    def call(dirs, *extra):
        out = tmp_path / "merged"
        code = main(["rs", *rs_flags(sft_model, demo_data, out, "--merge", ",".join(map(str, dirs)), *extra)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("align rs: error: --merge: "), err
        assert not (out / "stage.json").exists() and not (out / "data").exists()
        return err

    return call


@pytest.mark.slow
def test_merge_refuses_missing_duplicate_foreign_and_unfinished_parts(merge_cli, parts, tmp_path):
    assert "shard(s) 1/3 missing; run them, then merge all parts" in merge_cli([parts[0], parts[2]])
    assert f"shard 2/3 given twice ({parts[2]} and {parts[2]})" in merge_cli([*parts, parts[2]])
    err = merge_cli(parts, "--num_samples", "4")
    assert f"{parts[0]} was sampled with another config (num_samples: 8, here 4)" in err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(parts[1], unfinished)
    (unfinished / "stage.json").unlink()
    assert f"{unfinished} is not a finished rs stage (no stage.json)" in merge_cli([parts[0], unfinished, parts[2]])


def test_parts_tile_the_prompts_evenly(demo_data):
    ids = [r["prompt_id"] for r in load_prompts(str(demo_data / "prompts.jsonl"))]
    parts = [[pid for pid in ids if in_shard(pid, i, PARTS)] for i in range(PARTS)]
    assert sorted(pid for p in parts for pid in p) == sorted(ids)  # every prompt in exactly one part
    assert all(abs(len(p) - len(ids) / PARTS) < 0.1 * len(ids) / PARTS for p in parts), [len(p) for p in parts]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard", "3/3"], "'shard' must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got '3/3'"),
        (["--shard", "a/b"], "'shard' must be I/N with 0 <= I < N"),
        (["--shard", "0/2", "--merge", "x,y"], "--shard and --merge exclude each other"),
        (["--shard", "0/2", "--engine", "transformers"], "--shard with the transformers engine needs --batch_size 1"),
    ],
)
def test_bad_shard_options_exit_2(tiny_model, demo_data, tmp_path, capsys, extra, message):
    code = main(["rs", *rs_flags(tiny_model, demo_data, tmp_path / "out", *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "out").exists()
