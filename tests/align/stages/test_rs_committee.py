"""`align rs` over a committee (AFM's iTeC): the trained SFT model against the untrained tiny model.

The untrained model is listed first, so the tie-break (the first member wins ties) is on its side:
the better model has to win its rows on reward.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import datasets
import pytest
import torch

from align.cli import main
from align.core import preempt
from align.core.errors import EXIT_INTERRUPTED
from align.core.stage_dir import shard_files
from align.pipeline.status import key_metrics
from align.stages.rs import format_wins
from align.training.data import load_rows
from sampling import Scored, SelectOptions, get_strategy

from conftest import ALIGN, ROOT, read_jsonl

N, K = 32, 4


def flags(tiny_model: Path, sft_model: Path, demo_data: Path, out: Path, *extra) -> list[str]:
    """The committee run on the demo task: transformers engine, one prompt per batch (seeded per prompt)."""
    return [
        "rs",
        "--config",
        str(ROOT / "configs" / "demo_rs.yaml"),
        "--model_name_or_path",
        f"{tiny_model},{sft_model}",
        "--dataset",
        str(demo_data / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--max_prompts",
        str(N),
        "--num_samples",
        str(K),
        "--shard_size",
        "8",
        "--engine",
        "transformers",
        "--batch_size",
        "1",
        *map(str, extra),
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generate with one torch thread, as the vLLM engine does: on 2 shared cores a second thread
    makes each small step wait for its time slice (here 30-60x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def committee(tiny_model, sft_model, demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("committee") / "rs"
    assert main(flags(tiny_model, sft_model, demo_data, out)) == 0
    return out


def test_the_better_model_wins_most_rows_and_rows_name_their_model(committee, tiny_model, sft_model):
    record = json.loads((committee / "stage.json").read_text())
    summary = record["summary"]
    rows = datasets.load_from_disk(str(committee / "data")).to_list()
    worse, better = str(tiny_model), str(sft_model)
    assert key_metrics("rs", record)["wins"] == format_wins(summary["wins"])  # the align status column
    counted = {m: sum(r["model"] == m for r in rows) for m in (worse, better)}
    assert summary["wins"] == counted and sum(counted.values()) == summary["kept_rows"] == len(rows) > 0
    assert counted[better] > 3 * counted[worse]  # most rows come from the trained model
    assert summary["members"] == [worse, better]
    assert summary["member_mean_reward"][better] > summary["member_mean_reward"][worse]
    assert (summary["prompts"], summary["candidates"]) == (N, N * 2 * K)
    for r in rows:  # member m's candidates are numbered m*K .. m*K+K-1
        assert r["candidate_index"] // K == summary["members"].index(r["model"])
        assert r["completion"][0]["content"].strip() == r["answer"]  # demo_rs.yaml keeps correct answers only
    table = read_jsonl(committee / "candidates.jsonl")
    assert [t["model"] for t in table[: 2 * K]] == [worse] * K + [better] * K
    assert [t["candidate_index"] for t in table[: 2 * K]] == list(range(2 * K))


def test_committee_pairs_cross_members_in_trl_preference_format(tiny_model, sft_model, demo_data, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(flags(tiny_model, sft_model, demo_data, out, "--select", "pairs")) == 0
    line = capsys.readouterr().out
    rows = datasets.load_from_disk(str(out / "data")).to_list()
    by_prompt: dict[str, list[dict]] = {}
    for t in read_jsonl(out / "candidates.jsonl"):
        by_prompt.setdefault(t["prompt_id"], []).append(t)
    assert rows
    for r in rows:
        assert r["chosen_reward"] > r["rejected_reward"]
        assert r["chosen_model"] in (str(tiny_model), str(sft_model)) and r["rejected_model"] in (
            str(tiny_model),
            str(sft_model),
        )
        cross = [
            t
            for t in by_prompt[r["prompt_id"]]
            if t["model"] != r["chosen_model"] and t["reward"] < r["chosen_reward"]
        ]
        assert (r["rejected_model"] != r["chosen_model"]) == bool(cross)  # from another member wherever one lost
    assert sum(r["chosen_model"] != r["rejected_model"] for r in rows) > len(rows) // 2
    summary = json.loads((out / "stage.json").read_text())["summary"]
    wins = summary["wins"]
    assert wins == {m: sum(r["chosen_model"] == m for r in rows) for m in summary["members"]}
    assert f" x 2 models (rows per model: {format_wins(wins)}) " in line
    pref = load_rows(str(out / "data"), "preference")  # what `align rm --dataset DIR/data` reads
    assert (
        len(pref) == len(rows)
        and pref[0]["chosen"] == rows[0]["chosen"]
        and pref[0]["rejected"] == rows[0]["rejected"]
    )


def test_sharded_committee_merged_equals_the_unsharded_run(committee, tiny_model, sft_model, demo_data, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert main(flags(tiny_model, sft_model, demo_data, part, "--shard", f"{i}/2")) == 0
    merged = tmp_path / "merged"
    assert main(flags(tiny_model, sft_model, demo_data, merged, "--merge", ",".join(map(str, parts)))) == 0
    assert read_jsonl(merged / "candidates.jsonl") == read_jsonl(committee / "candidates.jsonl")
    assert (
        datasets.load_from_disk(str(merged / "data")).to_list()
        == datasets.load_from_disk(str(committee / "data")).to_list()
    )
    whole, got = (json.loads((d / "stage.json").read_text())["summary"] for d in (committee, merged))
    assert got["wins"] == whole["wins"] and got["member_mean_reward"] == whole["member_mean_reward"]


def test_interrupted_committee_resumes_to_the_uninterrupted_result(
    committee, tiny_model, sft_model, demo_data, tmp_path, monkeypatch
):
    out = tmp_path / "rs"
    # A stop request once 6 of the 8 (member, shard) units are on disk: inside the second member.
    monkeypatch.setattr(preempt, "requested", lambda: len(shard_files(out)) == 6)
    assert main(flags(tiny_model, sft_model, demo_data, out)) == EXIT_INTERRUPTED
    kept = {p.name for p in shard_files(out)}
    assert kept == {f"shard-{i:05d}-00.json" for i in range(4)} | {f"shard-{i:05d}-01.json" for i in range(2)}
    monkeypatch.setattr(preempt, "requested", lambda: False)
    assert main(flags(tiny_model, sft_model, demo_data, out)) == 0
    assert json.loads((out / "stage.json").read_text())["summary"]["resumed_shards"] == 6
    assert read_jsonl(out / "candidates.jsonl") == read_jsonl(committee / "candidates.jsonl")


def test_pairs_take_the_rejected_side_from_another_member():
    row = {"prompt": [{"role": "user", "content": "1+2="}], "answer": "3", "prompt_id": "p"}
    cands = [Scored(0, "a", 0.9, "A"), Scored(1, "b", 0.1, "A"), Scored(2, "c", 0.5, "B"), Scored(3, "d", 0.9, "B")]
    (pair,) = get_strategy("pairs")(row, cands, SelectOptions())
    assert (pair["chosen_index"], pair["rejected_index"], pair["chosen_model"], pair["rejected_model"]) == (
        0,
        2,
        "A",
        "B",
    )
    # no other member scores below the chosen: the worst overall, from the same member
    (pair,) = get_strategy("pairs")(
        row, [Scored(0, "a", 0.9, "A"), Scored(1, "b", 0.1, "A"), Scored(2, "c", 0.9, "B")], SelectOptions()
    )
    assert (pair["rejected_index"], pair["rejected_model"]) == (1, "A")


def test_wins_read_as_the_last_two_path_parts():
    assert (
        format_wins({"/w/sft/model": 30, "/w/dpo/model": 2, "HuggingFaceTB/SmolLM2-135M": 0})
        == "sft/model 30, dpo/model 2, HuggingFaceTB/SmolLM2-135M 0"
    )
    assert key_metrics("rs", {"summary": {"kept_rows": 3, "wins": {"/w/sft/model": 3}}}) == {
        "kept_rows": 3
    }  # one model


@pytest.mark.parametrize(
    "value, message",
    [
        ("{m},{m}", "lists {m} twice; committee members share the sampling seeds"),
        (",", "'model_name_or_path' names no model"),
    ],
)
def test_bad_committees_exit_2(tiny_model, demo_data, tmp_path, capsys, value, message):
    argv = flags(tiny_model, tiny_model, demo_data, tmp_path / "out")
    argv[argv.index("--model_name_or_path") + 1] = value.format(m=tiny_model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        message.format(m=tiny_model) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    )


@pytest.mark.slow
def test_vllm_committee_loads_one_member_at_a_time(tiny_model, sft_model, demo_data, tmp_path):
    out = tmp_path / "rs"
    argv = flags(
        tiny_model, sft_model, demo_data, out, "--engine", "vllm", "--kv_cache_gb", "0.25", "--max_prompts", 16
    )
    proc = subprocess.run([*ALIGN, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["engine"] == "vllm" and summary["candidates"] == 16 * 2 * K
    assert summary["wins"][str(sft_model)] > summary["wins"][str(tiny_model)]
    assert "rs: shard 1/4 (" in proc.stderr and "rs: shard 3/4 (" in proc.stderr


def test_one_model_is_recorded_as_before_committees_existed(tmp_path):
    """A one-member list records as the string rs took before committees, so a stage finished then
    stays up to date (identity and input fingerprints alike); two members stay a list."""
    from align.core.fingerprint import input_fingerprints
    from align.core.stage_dir import _identity
    from align.stages.rs import RSConfig

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    one = RSConfig(
        model_name_or_path=[str(tmp_path / "m")],
        dataset="d.jsonl",
        output_dir=str(tmp_path / "o"),
        reward=["rule:arithmetic"],
    )
    assert one.identity()["model_name_or_path"] == str(tmp_path / "m")
    assert input_fingerprints(one)["model_name_or_path"].startswith("tree:")
    assert _identity(one.resolved(), one) == one.identity()  # a stage.json written now (a list) matches too
    old = {**one.resolved(), "model_name_or_path": str(tmp_path / "m")}  # written before committees
    assert _identity(old, one) == one.identity()
    two = RSConfig(
        model_name_or_path=[str(tmp_path / "m"), "other"],
        dataset="d.jsonl",
        output_dir=str(tmp_path / "o"),
        reward=["rule:arithmetic"],
    )
    assert two.identity()["model_name_or_path"] == [str(tmp_path / "m"), "other"]
    assert isinstance(input_fingerprints(two)["model_name_or_path"], list)
