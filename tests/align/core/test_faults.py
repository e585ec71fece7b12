"""Faults a long run meets, with real processes: a disk or quota that fills up mid-write, a kill,
and artifacts cut short after they were written. Each must stop in one line naming the file (a
traceback only with --debug) or warn naming it, keep what was whole, and let a rerun end exactly
where a run that met no fault ends."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import _load_commands, main
from align.core import preempt
from align.core.config import parse_config
from align.core.errors import Interrupted
from align.core.registry import COMMANDS
from align.stages.rs import RSConfig, run_rs
from align.stages.sft import SFTConfig, run_sft

from conftest import ROOT, killed_after_checkpoint, read_jsonl, torch_threads

# Subprocesses import this checkout's packages, not whatever `align` the environment installed.
# Every run this module compares uses one torch thread (one_torch_thread in this process, forked
# children included), so all of them run the same kernels.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
STEPS, SAVE = 12, 4
FULL = 65536  # bytes a file may grow to once the disk is "full": metrics rows fit, weights do not

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_args(out: Path, tiny_model: Path, data: Path, steps: int = STEPS) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "demo_sft.yaml"),
        "--model_name_or_path",
        str(tiny_model),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--save_steps",
        str(SAVE),
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
    ]


@pytest.fixture(scope="module")
def sft_data(demo_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join((demo_data / "sft.jsonl").read_text().splitlines(keepends=True)[:200]))
    return path


@pytest.fixture(scope="module")
def sft_reference(tiny_model, sft_data, tmp_path_factory) -> Path:
    """The run that met no fault, in this process."""
    out = tmp_path_factory.mktemp("reference") / "sft"
    with torch_threads(1):
        run_sft(parse_config(SFTConfig, sft_args(out, tiny_model, sft_data)))
    return out


def step_rows(out: Path) -> list[dict]:
    """The per-step rows of metrics.jsonl (the end-of-training row holds wall-clock figures)."""
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def assert_same_run(out: Path, reference: Path) -> None:
    """Bitwise the same final weights and the same per-step metrics rows."""
    got, want = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert step_rows(out) == step_rows(reference)


def with_full_disk(trigger: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`align ARGS` in a process whose disk fills up (to FULL bytes a file) once ``trigger`` exists."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsize_child.py"), str(trigger), str(FULL), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=ENV,
    )


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_full_disk_stops_in_one_line_and_the_rerun_ends_as_if_never_stopped(
    tiny_model, sft_data, sft_reference, tmp_path, capsys
):
    out = tmp_path / "sft"
    args = ["sft", *sft_args(out, tiny_model, sft_data)]
    checkpoints = out / "checkpoints"
    # the disk fills once checkpoint-4 is whole: checkpoint-8's weights do not fit
    proc = with_full_disk(checkpoints / "checkpoint-4" / "trainer_state.json", args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (
        f"align sft: error: cannot write {checkpoints}/checkpoint-8/model.safetensors: File too"
        " large; free space, then rerun the same command to continue"
    )
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()  # whole: written last
    assert not (checkpoints / "checkpoint-8" / "trainer_state.json").exists()
    assert not (out / "stage.json").exists() and not (out / "model").exists()

    # space freed, the resumed run meets a full disk again while it writes the final model
    proc = with_full_disk(checkpoints / f"checkpoint-{STEPS}" / "trainer_state.json", [*args, "--resume"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (
        f"align sft: error: cannot write {out}/model/model.safetensors: File too large; free"
        " space, then rerun the same command to continue"
    )
    assert not (out / "stage.json").exists() and not (out / "model").exists() and not list(out.glob(".model.*"))

    # and the newest checkpoint's weights lost their end after its marker was written (a disk that
    # dropped blocks, a partial copy): that checkpoint is skipped, its steps trained again
    weights = checkpoints / f"checkpoint-{STEPS}" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    capsys.readouterr()
    record = run_sft(parse_config(SFTConfig, [*args[1:], "--resume"]))
    assert (
        f"warning: skipping incomplete checkpoint {checkpoints}/checkpoint-{STEPS} (model.safetensors is cut short"
        in capsys.readouterr().err
    )
    assert record["summary"]["resumed_from_step"] == 2 * SAVE and record["summary"]["global_step"] == STEPS
    assert_same_run(out, sft_reference)


@pytest.mark.slow
def test_a_cut_trainer_state_is_skipped_and_the_rerun_ends_as_if_never_stopped(
    tiny_model, sft_data, sft_reference, tmp_path, capsys
):
    """A run killed after its step-8 checkpoint, whose trainer_state.json (the marker, written last)
    then lost its end, as a kill while transformers writes it or a partial copy leaves it: the rerun
    warns naming the file, trains on from the step-4 checkpoint and ends bitwise as the run never
    stopped."""
    out = tmp_path / "sft"
    args = sft_args(out, tiny_model, sft_data)
    state = out / "checkpoints" / f"checkpoint-{2 * SAVE}" / "trainer_state.json"
    killed_after_checkpoint(lambda: run_sft(parse_config(SFTConfig, args)), state, hold_step=2 * SAVE + 1)
    state.write_text(state.read_text()[: state.stat().st_size // 2])
    capsys.readouterr()
    record = run_sft(parse_config(SFTConfig, [*args, "--resume"]))
    assert (
        f"warning: skipping incomplete checkpoint {state.parent} (trainer_state.json is not whole JSON: its write"
        " was cut short)\n" in capsys.readouterr().err
    )
    assert record["summary"]["resumed_from_step"] == SAVE and record["summary"]["global_step"] == STEPS
    assert_same_run(out, sft_reference)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("named", [True, False], ids=["error_names_file", "newest_file"])
def test_a_full_disk_or_quota_stops_in_one_line_naming_the_file(code, named, tmp_path, monkeypatch, capsys):
    """A write that fails with ENOSPC or EDQUOT anywhere in a command: exit 1 and one line naming the
    file (the error's own, else the newest file in the command's output_dir), no traceback unless
    --debug."""
    out = tmp_path / "data"
    written = out / "part.jsonl"

    def run(cfg):
        written.parent.mkdir(parents=True)
        written.write_text("{}\n")
        raise OSError(code, os.strerror(code), *([str(written)] if named else []))

    _load_commands()
    monkeypatch.setitem(COMMANDS._items, "demo-data", dataclasses.replace(COMMANDS["demo-data"], run=run))
    assert main(["demo-data", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"align demo-data: error: cannot write {written}: {os.strerror(code)}; free space, then rerun the same"
        " command to continue\n"
    )
    shutil.rmtree(out)
    assert main(["demo-data", str(out), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith(
        f"align demo-data: error: cannot write {written}: {os.strerror(code)}; free space, then rerun the same command to continue\n"
    )


@pytest.mark.slow
def test_a_damaged_model_is_refused_naming_the_file_and_the_stage_redoes_it(
    tiny_model, sft_data, demo_data, tmp_path, capsys
):
    """A finished stage's model cut to half: a stage reading it fails in one line (exit 2) in a real
    process, a rerun of the stage refuses to call it done, and with --overwrite redoes it."""
    out = tmp_path / "sft"
    flags = ["sft", *sft_args(out, tiny_model, sft_data, steps=SAVE)]
    assert main(flags) == 0
    trained = {
        name: t.clone() for name, t in load_file(out / "model" / "model.safetensors").items()
    }  # not the mapped file
    record = json.loads((out / "stage.json").read_text())
    weights = out / "model" / "model.safetensors"
    assert record["outputs"]["model/model.safetensors"]["size"] == weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    half = weights.stat().st_size

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "align",
            "eval",
            "--model_name_or_path",
            str(out / "model"),
            "--dataset",
            str(demo_data / "test.jsonl"),
            "--reward",
            "rule:arithmetic",
            "--engine",
            "transformers",
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=ENV,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"align eval: error: {weights} has {half} bytes, {half * 2} recorded when stage {out} finished: its output is"
        f" damaged or replaced; rerun that stage (align run redoes it) before using {out / 'model'}"
    )

    capsys.readouterr()
    assert main(flags) == 2
    assert capsys.readouterr().err.strip() == (
        f"align sft: error: {out} already holds a finished 'sft' stage with outputs that changed since it finished"
        f" (model/model.safetensors has {half} bytes, {half * 2} recorded); pass --overwrite to replace it or choose"
        " another --output_dir"
    )
    assert main([*flags, "--overwrite"]) == 0
    redone = load_file(weights)
    assert all(torch.equal(redone[name], trained[name]) for name in trained)

    # a model folder no stage recorded, cut short: refused by its safetensors header
    loose = tmp_path / "loose"
    shutil.copytree(tiny_model, loose)
    with open(loose / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model_name_or_path",
                str(loose),
                "--dataset",
                str(demo_data / "test.jsonl"),
                "--reward",
                "rule:arithmetic",
                "--engine",
                "transformers",
                "--output_dir",
                str(tmp_path / "eval2"),
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            f"align eval: error: {loose / 'model.safetensors'} is cut short (1000 bytes; its header alone needs"
        )
    )


def test_a_cut_rs_shard_is_sampled_again(tiny_model, demo_data, tmp_path, monkeypatch, capsys):
    """An unfinished rs run whose first shard file lost its end: the rerun samples that shard again
    (with a warning naming it) and ends with the candidates of a run that was never stopped."""

    def cfg(out: Path) -> RSConfig:
        return parse_config(
            RSConfig,
            [
                "--model_name_or_path",
                str(tiny_model),
                "--dataset",
                str(demo_data / "prompts.jsonl"),
                "--output_dir",
                str(out),
                "--max_prompts",
                "12",
                "--shard_size",
                "4",
                "--num_samples",
                "2",
                "--max_tokens",
                "6",
                "--temperature",
                "1.0",
                "--engine",
                "transformers",
                "--reward",
                "rule:arithmetic",
                "--select",
                "all",
                "--min_reward",
                "null",
            ],
        )

    run_rs(cfg(tmp_path / "reference"))
    calls = iter([False, True, True])
    with monkeypatch.context() as patch:  # a stop signal arrives during the second shard
        patch.setattr(preempt, "requested", lambda: next(calls))
        with pytest.raises(Interrupted, match="after shard 2/3"):
            run_rs(cfg(tmp_path / "rs"))
    shard = tmp_path / "rs" / "shards" / "shard-00000-00.json"
    shard.write_text(shard.read_text()[:100])
    capsys.readouterr()
    record = run_rs(cfg(tmp_path / "rs"))
    assert f"warning: shard file {shard} is not whole JSON; sampling that shard again" in capsys.readouterr().err
    assert record["summary"]["resumed_shards"] == 1
    assert read_jsonl(tmp_path / "rs" / "candidates.jsonl") == read_jsonl(tmp_path / "reference" / "candidates.jsonl")
