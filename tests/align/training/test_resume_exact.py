"""Resume gives the result of a run never stopped: for every training stage and every RL optimizer,
a run killed with SIGKILL after a checkpoint and resumed ends with bitwise the same final weights
(fp32 on CPU) and the same per-step metrics rows (losses, rewards, token counts, batch hashes) as
the run that never stopped. The killed run is a forked child of this process, held once it has
logged the step after the checkpoint and killed from here once the checkpoint's marker is whole, so
what it held in memory is lost and the row it logged past the checkpoint stays on disk for the
resume to drop. The run never stopped and the resume are in this process; all three use one torch
thread (``conftest.killed_after_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.core.config import parse_config
from align.rl.optimizers import OPTIMIZERS
from align.stages.distill import DistillConfig, run_distill
from align.stages.dpo import DPOConfig, run_dpo
from align.stages.rlhf import RLHFConfig, run_rlhf
from align.stages.rm import RMConfig, run_rm
from align.stages.sft import SFTConfig, run_sft

from conftest import ROOT, killed_after_checkpoint, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # every test trains twice

# Wall-clock fields of a metrics row: the only ones a resumed run may log differently.
CLOCK = ("time", "per_s", "seconds", "runtime")


@pytest.fixture(scope="module")
def data(demo_data, tmp_path_factory) -> dict[str, Path]:
    """Short SFT and preference files (the trainer runs below take 4 steps of 8 rows)."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, rows in (("sft", 64), ("pairs", 64)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join((demo_data / f"{name}.jsonl").read_text().splitlines(keepends=True)[:rows]))
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """Another tiny model of the same vocabulary for distillation to pull toward."""
    from align.tasks.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "model", arch="llama", tokenizer="char", seed=1)


def step_rows(out: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields and transformers' end-of-training row."""
    return [
        {k: v for k, v in row.items() if not any(c in k for c in CLOCK)}
        for row in read_jsonl(out / "metrics.jsonl")
        if "train_loss" not in row
    ]


def assert_same_result(resumed: Path, uninterrupted: Path) -> None:
    weights = (
        "adapter/adapter_model.safetensors" if (uninterrupted / "adapter").is_dir() else "model/model.safetensors"
    )
    got, want = load_file(resumed / weights), load_file(uninterrupted / weights)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert step_rows(resumed) == step_rows(uninterrupted)


def trainer_cases(tiny_model: Path, data: dict[str, Path], teacher: Path, tmp_path: Path) -> dict:
    steps = [
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--max_length",
        "64",
        "--per_device_train_batch_size",
        "8",
        "--model_name_or_path",
        str(tiny_model),
    ]
    pairs = ["--config", str(ROOT / "configs" / "demo_dpo.yaml"), "--dataset", str(data["pairs"]), *steps]
    return {
        "sft_lora": (
            SFTConfig,
            run_sft,
            [
                "--dataset",
                str(data["sft"]),
                "--learning_rate",
                "1e-3",
                "--use_lora",
                "true",
                "--lora_dropout",
                "0.1",
                *steps,
            ],
        ),
        "rm": (
            RMConfig,
            run_rm,
            [
                "--config",
                str(ROOT / "configs" / "demo_rm.yaml"),
                "--dataset",
                str(data["pairs"]),
                "--eval_split",
                "0.0",
                *steps,
            ],
        ),
        "dpo_live_reference": (
            DPOConfig,
            run_dpo,
            [*pairs, "--ref_model", str(tiny_model), "--precompute_ref_log_probs", "false"],
        ),
        "dpo_cached_reference": (DPOConfig, run_dpo, [*pairs, "--ref_cache_dir", str(tmp_path / "ref_cache")]),
        "distill_on_policy": (
            DistillConfig,
            run_distill,
            [
                "--config",
                str(ROOT / "configs" / "demo_distill.yaml"),
                "--teacher",
                str(teacher),
                "--dataset",
                str(data["sft"]),
                "--lmbda",
                "0.5",
                "--max_new_tokens",
                "8",
                *steps,
            ],
        ),
    }


# Full sft: tests/align/core/test_faults.py (a real process, resumed after a full disk, compared likewise).
@pytest.mark.parametrize("case", ["sft_lora", "rm", "dpo_live_reference", "dpo_cached_reference", "distill_on_policy"])
def test_trainer_stage_resumed_after_a_kill_ends_as_if_never_stopped(case, tiny_model, data, teacher, tmp_path):
    """Data order (the sampler's seed), dropout and sampling RNG (on-policy distillation draws its
    completions), optimizer and scheduler state all come back from the step-2 checkpoint."""
    config, run, flags = trainer_cases(tiny_model, data, teacher, tmp_path)[case]
    run(parse_config(config, [*flags, "--output_dir", str(tmp_path / "uninterrupted")]))
    killed = parse_config(config, [*flags, "--output_dir", str(tmp_path / "resumed")])
    marker = tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    killed_after_checkpoint(lambda: run(killed), marker, hold_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")][-1] == 3
    assert not (tmp_path / "resumed" / "stage.json").exists()
    record = run(parse_config(config, [*flags, "--output_dir", str(tmp_path / "resumed"), "--resume"]))
    assert record["summary"]["resumed_from_step"] == 2
    assert_same_result(tmp_path / "resumed", tmp_path / "uninterrupted")


@pytest.mark.parametrize("optimizer", [*OPTIMIZERS, "grpo+lora"])
def test_rlhf_resumed_after_a_kill_ends_as_if_never_stopped(optimizer, tiny_model, demo_data, tmp_path):
    """Batches (seeded by iteration), per-prompt sampling seeds, the optimizer's state (PPO's value
    head included), the RNG and the engine's weights (synced from the checkpoint's policy) come
    back, so iteration 3 samples and updates exactly as in the run never stopped."""
    name, *lora = optimizer.split("+")
    flags = [
        "--config",
        str(ROOT / "configs" / "demo_rlhf.yaml"),
        "--model_name_or_path",
        str(tiny_model),
        "--dataset",
        str(demo_data / "prompts.jsonl"),
        "--optimizer",
        name,
        "--num_iterations",
        "3",
        "--save_every",
        "2",
        "--prompts_per_iteration",
        "2",
        "--num_samples",
        "4",
        "--max_tokens",
        "6",
        "--engine",
        "transformers",
        *(["--use_lora", "true"] if lora else []),
    ]
    run_rlhf(parse_config(RLHFConfig, [*flags, "--output_dir", str(tmp_path / "uninterrupted")]))
    killed = parse_config(RLHFConfig, [*flags, "--output_dir", str(tmp_path / "resumed")])
    marker = tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "checkpoint.json"
    killed_after_checkpoint(lambda: run_rlhf(killed), marker, hold_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / "resumed" / "stage.json").exists()
    record = run_rlhf(parse_config(RLHFConfig, [*flags, "--output_dir", str(tmp_path / "resumed"), "--resume"]))
    assert record["summary"]["resumed_from_iteration"] == 2
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]
    assert_same_result(tmp_path / "resumed", tmp_path / "uninterrupted")
