"""`align sft` and `align rm` under `accelerate launch` with 2 CPU processes (DDP over gloo): only the
main process writes the stage dir (the other one writes its own RNG state into the checkpoints and
nothing else), each file is written once, and the result has the shape of a one-process run.

Who wrote what is recorded by an audit hook (``sys.addaudithook``, PEP 578) that a
``sitecustomize`` module installs in every process of the launch: the file opens for writing,
renames, mkdirs, removals and rmtrees under the test's folder, each tagged with the process's RANK.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, accelerate_2proc, read_jsonl, run_align

AUDIT = """
import json, os, sys
_log_path, _watch = os.environ["ALIGN_AUDIT_LOG"], os.environ["ALIGN_AUDIT_WATCH"]
_rank = os.environ.get("RANK", "0")
_log = open(f"{_log_path}.{os.getpid()}", "a", buffering=1)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}


def _record(event, path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_watch):
            _log.write(json.dumps({"rank": _rank, "event": event, "path": path}) + "\\n")


def _hook(event, args):
    if event not in _EVENTS:
        return
    if event == "open":
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if isinstance(args[1], str) else ""
        if not (flags & _WRITE or set(mode) & set("wax+")):
            return
    _record(event, args[0])
    if event == "os.rename":
        _record("renamed_to", args[1])


sys.addaudithook(_hook)
"""

FLAGS = [
    "--max_steps",
    4,
    "--logging_steps",
    2,
    "--save_steps",
    2,
    "--per_device_train_batch_size",
    4,
    "--max_length",
    64,
    "--learning_rate",
    "1e-3",
]


def _launch(command: str, flags: list, out: Path, audit: Path) -> list[dict]:
    """Run ``align COMMAND`` on 2 processes with the audit hook; returns the recorded events."""
    hook_dir = audit / "hook"
    hook_dir.mkdir(parents=True)
    (hook_dir / "sitecustomize.py").write_text(AUDIT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ALIGN_AUDIT_LOG": str(audit / "events"),
        "ALIGN_AUDIT_WATCH": str(out),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [
            *accelerate_2proc(),
            "-m",
            "align",
            command,
            *map(str, flags),
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [e for log in sorted(audit.glob("events.*")) for e in read_jsonl(log)]


def _check_written_once(events: list[dict], out: Path, moved: list[str]) -> None:
    ranks = Counter(e["rank"] for e in events)
    assert set(ranks) == {"0", "1"}, ranks  # the hook saw both processes
    ckpt = str(out / "checkpoints")
    # rank 1 only makes the checkpoint folders it saves its RNG state into (transformers'
    # checkpoint-N/rng_state_1.pth, written by torch's C++ writer, which raises no audit event)
    others = [e for e in events if e["rank"] != "0"]
    assert [e for e in others if not (e["event"] == "os.mkdir" and e["path"].startswith(ckpt))] == []
    # each artifact moved into place once; checkpoints removed once, after both ranks finished
    renamed = Counter(e["path"] for e in events if e["event"] == "renamed_to")
    for name in moved:
        assert renamed[str(out / name)] == 1, (name, renamed)
    opened = Counter(e["path"] for e in events if e["event"] == "open")
    assert opened[str(out / "loss.png")] == 1  # drawn once
    assert [e["rank"] for e in events if e["event"] == "shutil.rmtree" and e["path"] == ckpt] == ["0"]
    appends = [e for e in events if e["event"] == "open" and e["path"] == str(out / "metrics.jsonl")]
    assert {e["rank"] for e in appends} == {"0"}


def _single(command: str, flags: list, out: Path) -> dict:
    run_align(command, *flags, "--output_dir", out, check=True)
    return json.loads((out / "stage.json").read_text())


@pytest.mark.slow
def test_sft_two_cpu_processes(tiny_model, demo_data, tmp_path):
    train = tmp_path / "sft.jsonl"
    train.write_text("".join((demo_data / "sft.jsonl").read_text().splitlines(keepends=True)[:64]))
    prompts = tmp_path / "test.jsonl"
    prompts.write_text("".join((demo_data / "test.jsonl").read_text().splitlines(keepends=True)[:6]))
    flags = [
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        train,
        "--eval_dataset",
        prompts,
        "--eval_max_tokens",
        4,
        *FLAGS,
    ]
    out = tmp_path / "two"
    events = _launch("sft", flags, out, tmp_path / "audit")
    _check_written_once(events, out, ["stage.json", "model", "eval.jsonl"])

    record = json.loads((out / "stage.json").read_text())
    s = record["summary"]
    assert record["status"] == "complete" and s["num_processes"] == 2 and s["global_step"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [2, 4]
    assert len(read_jsonl(out / "eval.jsonl")) == 6 and s["eval_prompts"] == 6
    assert not (out / "checkpoints").exists()

    one = _single("sft", flags, tmp_path / "one")
    assert one["summary"]["num_processes"] == 1
    assert sorted(one["summary"]) == sorted(s) and sorted(one["artifacts"]) == sorted(record["artifacts"])
    assert (
        sorted(p.name for p in out.iterdir())
        == sorted(p.name for p in (tmp_path / "one").iterdir())
        == ["eval.jsonl", "loss.png", "metrics.jsonl", "model", "stage.json"]
    )


@pytest.mark.slow
def test_rm_two_cpu_processes(tiny_model, demo_data, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((demo_data / "pairs.jsonl").read_text().splitlines(keepends=True)[:48]))
    flags = ["--model_name_or_path", tiny_model, "--dataset", pairs, "--eval_split", 0.25, *FLAGS]
    out = tmp_path / "two"
    events = _launch("rm", flags, out, tmp_path / "audit")
    _check_written_once(events, out, ["stage.json", "model"])

    record = json.loads((out / "stage.json").read_text())
    s = record["summary"]
    assert record["status"] == "complete" and s["num_processes"] == 2 and s["global_step"] == 4
    assert s["train_rows"] == 36 and s["eval_rows"] == 12 and 0.0 <= s["eval_accuracy"] <= 1.0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [2, 4]

    one = _single("rm", flags, tmp_path / "one")
    assert one["summary"]["num_processes"] == 1
    assert sorted(one["summary"]) == sorted(s) and sorted(one["artifacts"]) == sorted(record["artifacts"])
    assert (
        sorted(p.name for p in out.iterdir())
        == sorted(p.name for p in (tmp_path / "one").iterdir())
        == ["loss.png", "metrics.jsonl", "model", "stage.json"]
    )
