"""``align select``: the best model of earlier stages by a metric, with a baseline and min_gain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.stages.select import choose

from conftest import run_align


def test_choose_picks_the_best_and_ties_go_to_the_earliest():
    assert choose([0.2, 0.7, 0.5]) == 1
    assert choose([0.7, 0.2, 0.7]) == 0  # a tie: the first listed
    assert choose([0.3, 0.1, 0.1], mode="min") == 1  # a loss: the lowest, ties to the first


def test_choose_keeps_the_baseline_unless_beaten_by_more_than_min_gain():
    assert choose([0.60, 0.62], baseline=0.61) == 1
    assert choose([0.60, 0.62], baseline=0.61, min_gain=0.02) is None  # +0.01 is not enough
    assert choose([0.60, 0.64], baseline=0.61, min_gain=0.02) == 1
    assert choose([0.61], baseline=0.61) is None  # equal is not better
    assert choose([0.5, 0.4], mode="min", baseline=0.45) == 1
    assert choose([0.5, 0.46], mode="min", baseline=0.45) is None


def fake_eval(root: Path, name: str, value: float | None, model: Path) -> Path:
    """A finished eval stage dir that evaluated ``model`` (a folder with one weights file)."""
    model.mkdir(parents=True, exist_ok=True)
    (model / "model.safetensors").write_text(f"weights of {model.name}")
    stage = root / name
    stage.mkdir(parents=True)
    summary = {"num_prompts": 200} if value is None else {"mean_reward": value, "num_prompts": 200}
    (stage / "stage.json").write_text(
        json.dumps(
            {
                "stage": "eval",
                "status": "complete",
                "summary": summary,
                "config": {"model_name_or_path": str(model)},
                "artifacts": {},
            }
        )
    )
    return stage


@pytest.mark.slow
def test_select_links_the_chosen_model_and_records_every_candidate(tmp_path):
    a = fake_eval(tmp_path, "eval_a", 0.61, tmp_path / "a" / "model")
    b = fake_eval(tmp_path, "eval_b", 0.70, tmp_path / "b" / "model")
    c = fake_eval(tmp_path, "eval_c", 0.70, tmp_path / "c" / "model")
    run_align(
        "select",
        "--candidates",
        f"{a},{b},{c}",
        "--metric",
        "mean_reward",
        "--output_dir",
        tmp_path / "best",
        check=True,
    )
    record = json.loads((tmp_path / "best" / "stage.json").read_text())
    s = record["summary"]
    assert (s["chosen"], s["chosen_model"], s["mean_reward"], s["kept_baseline"]) == (
        "eval_b",
        str(tmp_path / "b" / "model"),
        0.70,
        False,
    )
    assert [(Path(c["stage"]).name, c["value"]) for c in s["candidates"]] == [
        ("eval_a", 0.61),
        ("eval_b", 0.70),
        ("eval_c", 0.70),
    ]
    assert (tmp_path / "best" / "model" / "model.safetensors").read_text() == "weights of model"  # b's, linked
    assert (tmp_path / "best" / "model" / "model.safetensors").stat().st_ino == (
        tmp_path / "b" / "model" / "model.safetensors"
    ).stat().st_ino
    # A select stage is itself a candidate (the best so far), and the baseline wins under min_gain.
    d = fake_eval(tmp_path, "eval_d", 0.72, tmp_path / "d" / "model")
    run_align(
        "select",
        "--candidates",
        str(d),
        "--baseline",
        tmp_path / "best",
        "--metric",
        "mean_reward",
        "--min_gain",
        "0.05",
        "--output_dir",
        tmp_path / "best2",
        check=True,
    )
    s2 = json.loads((tmp_path / "best2" / "stage.json").read_text())["summary"]
    assert (s2["chosen"], s2["kept_baseline"], s2["baseline"]["value"]) == ("best", True, 0.70)
    assert s2["chosen_model"] == str(tmp_path / "best" / "model")


@pytest.mark.parametrize(
    "case,message",
    [
        (
            "no_metric",
            r"candidate .*eval_x \(eval stage\) has no numeric 'mean_reward' in its summary; it has: num_prompts",
        ),
        ("unfinished", r"candidate .*nothing is not a finished stage \(no complete stage.json\); run it first"),
    ],
)
def test_bad_candidates_are_one_line_exit_2(tmp_path, case, message):
    import re

    target = (
        fake_eval(tmp_path, "eval_x", None, tmp_path / "x" / "model") if case == "no_metric" else tmp_path / "nothing"
    )
    proc = run_align("select", "--candidates", target, "--metric", "mean_reward", "--output_dir", tmp_path / "best")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "best").exists()
