"""`align run` under repeated kill -9: a two-stage recipe (sft, then eval of its model) killed at
seeded random moments in each stage, stopped by SIGTERM during eval (exit 3) while a second run
finds the workdir locked (exit 75), and rerun until done, ends with the status table, the model
(bitwise) and the eval rows of a run never stopped. Then a finished stage's model is cut short:
`align status` calls it stale, naming the file, and the plan redoes it.

The seed is printed; ALIGN_KILL_SEED=N replays a failure."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_jsonl

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}


def recipe(path: Path, workdir: Path, tiny_model: Path, data: Path, test: Path) -> Path:
    path.write_text(f"""workdir: {workdir}
stages:
  - name: sft
    kind: sft
    config: {ROOT / "configs" / "demo_sft.yaml"}
    model_name_or_path: {tiny_model}
    dataset: {data}
    max_steps: 8
    save_steps: 2
    logging_steps: 1
    per_device_train_batch_size: 8
  - name: eval
    kind: eval
    model_name_or_path: ${{sft.model}}
    dataset: {test}
    reward: [rule:arithmetic]
    max_tokens: 4
    max_prompts: 8
    engine: transformers
""")
    return path


def align(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=ENV,
    )


def kill_when(path: Path, ready, delay: float, log: Path) -> bool:
    """Start `align run`, SIGKILL it ``delay`` seconds after ``ready()`` holds; False if it ended first."""
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "align", "run", str(path)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV
        )
    deadline = time.time() + 600
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    ended = proc.poll() is not None
    proc.kill()
    proc.wait()
    return not ended


def running_eval(workdir: Path, pid: int) -> bool:
    """Whether the runner ``pid`` (not a killed one before it) has started the eval stage."""
    run = json.loads((workdir / "run.json").read_text())
    return run["pid"] == pid and run["stages"]["eval"].get("status") == "running"


def status(workdir: Path) -> list[dict]:
    """`align status --json` without the fields that hold times."""
    rows = json.loads(align("status", workdir, "--json").stdout)
    return [{k: v for k, v in row.items() if k not in ("duration_s", "finished_at", "dir")} for row in rows]


def test_run_killed_at_random_moments_ends_as_if_never_killed(tiny_model, demo_data, tmp_path):
    seed = int(os.environ.get("ALIGN_KILL_SEED", random.randrange(10**6)))
    print(f"kill seed {seed} (ALIGN_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((demo_data / "sft.jsonl").read_text().splitlines(keepends=True)[:64]))
    test = demo_data / "test.jsonl"
    calm = recipe(tmp_path / "calm.yaml", tmp_path / "calm", tiny_model, data, test)
    assert align("run", calm).returncode == 0

    killed, work = recipe(tmp_path / "killed.yaml", tmp_path / "killed", tiny_model, data, test), tmp_path / "killed"
    log = tmp_path / "runner.log"
    moments = [  # in sft after a checkpoint (possibly during the next one), then in eval
        (lambda: any((work / "sft" / "checkpoints").glob("checkpoint-*/trainer_state.json")), rng.uniform(0.0, 3.0)),
        (lambda: (work / "eval" / "log.txt").is_file(), rng.uniform(0.0, 1.0)),  # eval takes longer to start
    ]
    for ready, delay in moments:
        print(f"kill {delay:.2f} s after the mark")
        kill_when(killed, ready, delay, log)
        for row in status(work):  # a stage with a stage.json has every output it recorded
            assert row["status"] != "stale", row
    # eval has no safe point: SIGTERM lets it finish, then the run exits 3; meanwhile a second run
    # finds the workdir locked and exits 75 at once
    with open(log, "a") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "align", "run", str(killed)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=ENV,
        )
    deadline = time.time() + 600
    while not running_eval(work, first.pid):
        assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # the runner holds the lock however long the second run takes to start
    second = align("run", killed)
    assert second.returncode == 75 and "is in use by another align run" in second.stderr, second.stderr
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 3, log.read_text()[-3000:]
    assert json.loads((work / "run.json").read_text())["stages"]["eval"]["status"] == "interrupted"
    final = align("run", killed)
    assert final.returncode == 0, final.stdout[-3000:] + log.read_text()[-3000:]

    assert status(work) == status(tmp_path / "calm")
    got, want = (
        load_file(work / "sft" / "model" / "model.safetensors"),
        load_file(tmp_path / "calm" / "sft" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert read_jsonl(work / "eval" / "eval.jsonl") == read_jsonl(tmp_path / "calm" / "eval" / "eval.jsonl")
    sft_steps = [r for r in read_jsonl(work / "sft" / "metrics.jsonl") if "loss" in r]
    assert sft_steps == [r for r in read_jsonl(tmp_path / "calm" / "sft" / "metrics.jsonl") if "loss" in r]

    # a finished stage's model cut short: stale, with the file named; the next run redoes sft and eval
    weights = work / "sft" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    rows = {r["name"]: r for r in status(work)}
    assert rows["sft"]["status"] == "stale"
    assert rows["sft"]["why"] == f"output changed: model/model.safetensors has {size // 2} bytes, {size} recorded"
    assert rows["eval"]["status"] == "stale" and rows["eval"]["why"] == "upstream sft reruns"
    plan = align("run", killed, "--dry-run").stdout
    assert "overwrite" in plan and "output changed" in plan
