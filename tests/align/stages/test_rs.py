"""`align rs`: best-of-K beats greedy, the output formats, kill -9 + rerun, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import datasets
import pytest

from align.cli import main
from align.core.config import parse_config
from align.core.stage_dir import shard_files
from align.stages.rs import RSConfig, run_rs
from align.training.data import load_rows
from sampling import ENGINES, STRATEGIES, SamplingParams

import rs_scorers
from conftest import ALIGN, ROOT, read_jsonl

K = 8


def rs_config(sft_model, demo_data, out, *extra) -> RSConfig:
    return parse_config(
        RSConfig,
        [
            "--config",
            str(ROOT / "configs" / "demo_rs.yaml"),
            "--model_name_or_path",
            str(sft_model),
            "--dataset",
            str(demo_data / "prompts.jsonl"),
            "--output_dir",
            str(out),
            *map(str, extra),
        ],
    )


def exact(row: dict) -> bool:
    return row["completion"][0]["content"].strip() == row["answer"]


@pytest.mark.slow
def test_best_of_k_data_is_far_more_accurate_than_greedy(sft_vllm, sft_model, demo_data, tmp_path):
    n = 200
    cfg = rs_config(
        sft_model, demo_data, tmp_path / "rs", "--max_prompts", n, "--min_reward", "null", "--shard_size", 64
    )
    record = run_rs(cfg, engine=sft_vllm)
    prompts = load_rows(str(demo_data / "prompts.jsonl"), "prompt")[:n]

    greedy = sft_vllm.generate([p["prompt"] for p in prompts], SamplingParams(temperature=0.0, max_tokens=8))
    greedy_acc = sum(c[0].text.strip() == p["answer"] for c, p in zip(greedy, prompts)) / n

    data = datasets.load_from_disk(str(tmp_path / "rs" / "data"))
    assert data.column_names == ["prompt", "answer", "prompt_id", "completion", "candidate_index", "reward", "model"]
    assert data["prompt_id"] == [p["prompt_id"] for p in prompts]  # every prompt once, in order
    rows = data.to_list()
    data_acc = sum(map(exact, rows)) / n
    print(f"greedy exact-match {greedy_acc:.3f}, best-of-{K} data exact-match {data_acc:.3f}")
    assert greedy_acc > 0.02  # the SFT model learned something
    # Far above greedy: 25 points more, or (for a strong model) at most half its errors.
    assert data_acc >= greedy_acc + 0.25 or 1 - data_acc <= (1 - greedy_acc) / 2
    assert all(r["reward"] == float(exact(r)) for r in rows)

    table = read_jsonl(tmp_path / "rs" / "candidates.jsonl")
    assert len(table) == n * K
    assert [(t["prompt_id"], t["candidate_index"]) for t in table[:K]] == [
        (prompts[0]["prompt_id"], k) for k in range(K)
    ]
    for i, t in enumerate(table):
        if t["duplicate_of"] is not None:
            assert (
                t["duplicate_of"] < t["candidate_index"]
                and t["text"] == table[i - t["candidate_index"] + t["duplicate_of"]]["text"]
            )
    s = record["summary"]
    rewards = [t["reward"] for t in table]
    assert (s["prompts"], s["candidates"], s["kept_rows"], s["shards"]) == (n, n * K, n, 4)
    assert s["distinct_candidates"] == sum(t["duplicate_of"] is None for t in table) < n * K
    assert s["mean_reward"] == pytest.approx(sum(rewards) / len(rewards)) and s["max_reward"] == 1.0
    assert s["mean_best_reward"] == pytest.approx(data_acc)
    # The rate is reported, not judged here: bench/bench_generation.py measures it ("rs" row).
    assert s["tokens"] == sum(t["num_tokens"] for t in table)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["generate_seconds"], rel=0.01)
    assert s["truncated_frac"] == sum(t["finish_reason"] == "length" for t in table) / len(table)
    assert json.loads((tmp_path / "rs" / "stage.json").read_text())["status"] == "complete"
    assert not (tmp_path / "rs" / "shards").exists()
    # The data is SFT input as is (align.training.data reads the folder), and a rerun is a no-op.
    assert load_rows(str(tmp_path / "rs" / "data"), "sft")[0]["completion"] == rows[0]["completion"]
    assert run_rs(cfg, engine=sft_vllm)["finished_at"] == record["finished_at"]


@pytest.mark.slow
def test_pairs_and_all(sft_vllm, sft_model, demo_data, tmp_path):
    n = 64
    pairs = run_rs(
        rs_config(
            sft_model, demo_data, tmp_path / "pairs", "--max_prompts", n, "--select", "pairs", "--temperature", 1.5
        ),
        engine=sft_vllm,
    )
    every = run_rs(
        rs_config(sft_model, demo_data, tmp_path / "all", "--max_prompts", n, "--select", "all", "--temperature", 1.5),
        engine=sft_vllm,
    )
    table = read_jsonl(tmp_path / "pairs" / "candidates.jsonl")
    assert table == read_jsonl(tmp_path / "all" / "candidates.jsonl")  # same seed, same candidates

    by_prompt: dict[str, list[dict]] = {}
    for t in table:
        by_prompt.setdefault(t["prompt_id"], []).append(t)
    mixed = [pid for pid, ts in by_prompt.items() if len({t["reward"] for t in ts}) > 1]
    rows = datasets.load_from_disk(str(tmp_path / "pairs" / "data")).to_list()
    assert [r["prompt_id"] for r in rows] == mixed and 0 < len(mixed) < n  # ties (all right / all wrong) skipped
    for r in rows:
        assert r["chosen_reward"] == 1.0 and r["rejected_reward"] == 0.0
        assert r["chosen"][0]["content"].strip() == r["answer"] != r["rejected"][0]["content"].strip()
    assert load_rows(str(tmp_path / "pairs" / "data"), "preference")[0]["rejected"] == rows[0]["rejected"]

    rows = datasets.load_from_disk(str(tmp_path / "all" / "data")).to_list()
    distinct = [
        (t["prompt_id"], t["candidate_index"], t["text"], t["reward"]) for t in table if t["duplicate_of"] is None
    ]
    assert [
        (r["prompt_id"], r["candidate_index"], r["completion"][0]["content"], r["reward"]) for r in rows
    ] == distinct
    assert every["summary"]["kept_rows"] == len(distinct) == every["summary"]["distinct_candidates"]
    assert pairs["summary"]["kept_rows"] == len(mixed)


@pytest.mark.slow
def test_kill_9_then_rerun_continues_and_matches_an_uninterrupted_run(sft_vllm, sft_model, demo_data, tmp_path):
    out, n, shard = tmp_path / "killed", 160, 16
    argv = [
        *ALIGN,
        "rs",
        "--config",
        ROOT / "configs" / "demo_rs.yaml",
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "prompts.jsonl",
        "--output_dir",
        out,
        "--max_prompts",
        n,
        "--shard_size",
        shard,
        "--reward",
        "rs_scorers:slow_arithmetic",
        "--engine",
        "vllm",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "usercode")}
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while len(shard_files(out)) < 2:
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline, "no shard written in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = len(shard_files(out))
    assert 2 <= written < n // shard and not (out / "stage.json").exists() and not (out / "data").exists()

    done = subprocess.run([str(a) for a in argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["resumed_shards"] >= written and summary["shards"] == n // shard
    assert summary["prompts"] == n and summary["candidates"] == n * K
    table = read_jsonl(out / "candidates.jsonl")
    ids = [t["prompt_id"] for t in table[::K]]
    assert len(ids) == len(set(ids)) == n  # no loss, no duplicates
    kept = datasets.load_from_disk(str(out / "data")).to_list()  # demo_rs.yaml keeps correct answers only
    assert [r["prompt_id"] for r in kept] == [pid for pid in ids if pid in {r["prompt_id"] for r in kept}]
    assert len(kept) == summary["kept_rows"] > 0 and all(map(exact, kept))

    # The same config uninterrupted (in-process engine) gives exactly the same candidates.
    cfg = rs_config(sft_model, demo_data, tmp_path / "whole", "--max_prompts", n, "--shard_size", 64)
    run_rs(cfg, engine=sft_vllm)
    assert [(t["prompt_id"], t["text"]) for t in read_jsonl(tmp_path / "whole" / "candidates.jsonl")] == [
        (t["prompt_id"], t["text"]) for t in table
    ]


def test_rerun_with_another_config_over_unfinished_shards_fails(tiny_model, demo_data, tmp_path, capsys):
    out = tmp_path / "rs"
    (out / "shards").mkdir(parents=True)
    argv = [
        "rs",
        "--config",
        str(ROOT / "configs" / "demo_rs.yaml"),
        "--model_name_or_path",
        str(tiny_model),
        "--dataset",
        str(demo_data / "prompts.jsonl"),
        "--output_dir",
        str(out),
    ]
    identity = parse_config(RSConfig, argv[1:]).identity()
    (out / "shards" / "manifest.json").write_text(
        json.dumps({**identity, "num_samples": 2, "inputs": {}}, default=str)
    )
    (out / "shards" / "shard-00000-00.json").write_text("[]")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.strip().endswith(
        f"{out} already holds an unfinished 'rs' run with a different config (num_samples: 2 -> 8); pass --overwrite"
        " to replace it or choose another --output_dir"
    )


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture()
def rs_cli(tiny_model, demo_data, tmp_path, capsys):
    def call(*extra, dataset=None):
        out = tmp_path / "out"
        code = main(
            [
                "rs",
                "--config",
                str(ROOT / "configs" / "demo_rs.yaml"),
                "--model_name_or_path",
                str(tiny_model),
                "--dataset",
                str(dataset or demo_data / "prompts.jsonl"),
                "--output_dir",
                str(out),
                *map(str, extra),
            ]
        )
        err = capsys.readouterr().err
        lines = [
            line for line in err.splitlines() if line.strip() and "Loading weights" not in line
        ]  # transformers' bar, in-process
        assert code == 2 and len(lines) == 1 and lines[0].startswith("align rs: error: ") and "Traceback" not in err, (
            err
        )
        assert (
            not (out / "stage.json").exists()
            and not (out / "data").exists()
            and not (out / "candidates.jsonl").exists()
        )
        return err

    return call


def test_prompts_without_the_answer_column(rs_cli, tmp_path):
    data = tmp_path / "no_answer.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+2="}], "prompt_id": "q1"}) + "\n")
    err = rs_cli(dataset=data)
    assert f"{data} (prompt q1): rule 'exact_match' needs an 'answer' column" in err  # rule:arithmetic is exact_match
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_samples", "0"], "'num_samples' must be >= 1 (K candidates per prompt), got 0"),
        (
            ["--select", "bestof"],
            f"unknown selection strategy 'bestof' (did you mean 'best'?); valid: {', '.join(STRATEGIES)}",
        ),
        (["--reward", "rule:arithmetc"], "unknown reward rule 'arithmetc' (did you mean 'arithmetic'?); valid:"),
        (["--reward", "nonsense"], "reward 'nonsense' is not a scorer spec; use one of:"),
        (["--engine", "hf"], f"unknown engine 'hf'; valid: {', '.join(ENGINES)}"),
    ],
)
def test_bad_options_exit_2(rs_cli, extra, message):
    assert message in rs_cli(*extra)


@pytest.mark.slow
def test_nan_reward_names_the_prompt(rs_cli, demo_data, monkeypatch):
    bad = load_rows(str(demo_data / "prompts.jsonl"), "prompt")[2]["prompt_id"]
    monkeypatch.setattr(rs_scorers, "NAN_PROMPT", bad)
    err = rs_cli(
        "--reward", "rs_scorers:nan_for_one", "--engine", "transformers", "--max_prompts", 4, "--num_samples", 2
    )
    assert f"scorer rs_scorers:nan_for_one returned nan for prompt {bad}; fix the scorer" in err


@pytest.mark.slow
def test_reward_model_with_another_tokenizer_scores_the_text(sft_vllm, sft_model, demo_data, tmp_path):
    """The policy uses a char tokenizer, the reward model a BPE one: scorers see text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.tasks.tiny import make_tiny_model
    from reward.model import RewardModel

    base = make_tiny_model(tmp_path / "bpe", tokenizer="bpe", seed=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "rm")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "rm")) != len(sft_vllm.tokenizer)

    record = run_rs(
        rs_config(
            sft_model,
            demo_data,
            tmp_path / "rs",
            "--max_prompts",
            16,
            "--num_samples",
            4,
            "--temperature",
            1.5,
            "--select",
            "pairs",
            "--reward",
            f"model:{tmp_path / 'rm'}",
        ),
        engine=sft_vllm,
    )
    table = read_jsonl(tmp_path / "rs" / "candidates.jsonl")
    prompts = {
        r["prompt_id"]: r["prompt"][0]["content"] for r in load_rows(str(demo_data / "prompts.jsonl"), "prompt")[:16]
    }
    direct = RewardModel.from_pretrained(tmp_path / "rm").score(
        [prompts[t["prompt_id"]] for t in table], [t["text"] for t in table], [{} for _ in table]
    )
    assert [t["reward"] for t in table] == pytest.approx(direct, abs=1e-5)
    assert len({round(t["reward"], 6) for t in table}) > 8  # a real, varying score
    assert record["summary"]["kept_rows"] == sum(
        len({t["text"] for t in table if t["prompt_id"] == pid}) > 1 for pid in prompts
    )
