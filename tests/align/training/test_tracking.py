"""``--report_to``: transformers' tracker integrations get the rows metrics.jsonl records, in the
trainer stages (sft here; rm and dpo share ``TrainOptions``) and in the rlhf loop. Read back with
TensorBoard's own EventAccumulator; unknown tracker names are one line listing the valid ones."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest

from align.cli import main

from conftest import read_jsonl, run_align


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")})
    assert len(runs) == 1, runs  # one run, written by one process
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def _metrics_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What transformers' TensorBoard callback logs for these rows: every number but the step,
    under ``train/`` (``rewrite_logs``), at the row's step."""
    out = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"train/{key}"].append((row["step"], float(value)))
    return {k: sorted(v) for k, v in out.items()}


def _assert_equal(events: dict, metrics: dict) -> None:
    assert sorted(events) == sorted(metrics)
    for tag, points in metrics.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        for (_, got), (_, want) in zip(events[tag], points):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6), (tag, got, want)  # stored as float32


@pytest.mark.slow
def test_sft_tensorboard_scalars_equal_metrics(tiny_model, demo_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    run_align(
        "sft",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--max_steps",
        4,
        "--logging_steps",
        1,
        "--per_device_train_batch_size",
        4,
        "--max_length",
        64,
        "--learning_rate",
        "1e-3",
        "--report_to",
        "tensorboard",
        "--output_dir",
        out,
        check=True,
    )
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    metrics = _metrics_scalars(rows)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/train_runtime"} <= set(metrics)
    _assert_equal(_tensorboard_scalars(out / "tensorboard"), metrics)
    assert not (out / "checkpoints").exists()  # the event files live outside the removed checkpoints


@pytest.mark.slow
def test_rlhf_tensorboard_scalars_equal_metrics(tiny_model, demo_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "rlhf"
    run_align(
        "rlhf",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "prompts.jsonl",
        "--reward",
        "rule:arithmetic",
        "--engine",
        "transformers",
        "--optimizer",
        "rloo",
        "--num_iterations",
        3,
        "--prompts_per_iteration",
        2,
        "--num_samples",
        2,
        "--max_tokens",
        4,
        "--max_model_len",
        64,
        "--save_every",
        3,
        "--report_to",
        "tensorboard",
        "--output_dir",
        out,
        check=True,
    )
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    metrics = _metrics_scalars(rows)
    assert {"train/reward_mean", "train/samples", "train/time_generate"} <= set(metrics)
    _assert_equal(_tensorboard_scalars(out / "tensorboard"), metrics)


def test_default_reports_nowhere(tmp_path):
    """No --report_to: TrainingArguments get none (transformers' own default would be "none" too)."""
    from align.core.config import parse_config
    from align.core.stage_dir import Stage
    from align.stages.sft import SFTConfig
    from align.training.trainer import trl_args

    cfg = parse_config(SFTConfig, ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path / "o")])
    assert cfg.report_to == [] and trl_args(cfg, Stage("sft", cfg, cfg.output_dir))["report_to"] == []
    cfg = parse_config(
        SFTConfig,
        [
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--output_dir",
            str(tmp_path / "o"),
            "--report_to",
            "tensorboard",
        ],
    )
    assert trl_args(cfg, Stage("sft", cfg, cfg.output_dir))["report_to"] == ["tensorboard"]


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "rlhf"])
def test_unknown_tracker_exits_2_listing_valid_ones(command, tiny_model, demo_data, tmp_path, capsys):
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    data = {"sft": "sft.jsonl", "rm": "pairs.jsonl", "dpo": "pairs.jsonl", "rlhf": "prompts.jsonl"}[command]
    extra = ["--reward", "rule:arithmetic"] if command == "rlhf" else []
    code = main(
        [
            command,
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / data),
            *extra,
            "--report_to",
            "tensorbord",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"align {command}: error: unknown tracker 'tensorbord' in 'report_to' (did you mean 'tensorboard'?);"
        f" valid: {', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none)"
    )
    assert not (tmp_path / "out").exists()


def test_tracker_without_its_package_is_one_line():
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from align.core.errors import ConfigError
    from align.training.tracking import check_trackers

    missing = sorted(
        set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()) - {"flyte", "kubeflow"}
    )
    if not missing:
        pytest.skip("every tracker transformers knows is installed")
    with pytest.raises(ConfigError, match=f"^'report_to' {missing[0]}: its package is not installed"):
        check_trackers([missing[0]])
    check_trackers(["none"])  # transformers' spelling of no tracker
