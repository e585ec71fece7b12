"""`align run` end to end with real stages: the quickstart recipe on its small `test` profile, run
once by executing examples/quickstart.ipynb (the Python API), then with the CLI: no-op reruns
(ending with the table), `--set` and replaced inputs (asserted from stage timestamps), status/report, and real
kills: the same recipe killed with kill -9 at seeded random moments and rerun until done ends as the
notebook's run did (ALIGN_KILL_SEED=N replays the moments a failure printed), a second run while one
holds the workdir exits 75, SIGTERM during an eval and during sft exits 3."""

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

from conftest import ALIGN, ROOT, read_jsonl

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
STAGES = [
    "data",
    "tiny",
    "sft",
    "eval_sft",
    "rm",
    "rs",
    "sft_rs",
    "eval_sft_rs",
    "rs_pairs",
    "dpo",
    "eval_dpo",
    "rlhf",
    "eval_rlhf",
]
EVALS = ["eval_sft", "eval_sft_rs", "eval_dpo", "eval_rlhf"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The runner and its children share one fingerprint cache, private to this module."""
    cache = tmp_path_factory.mktemp("fp") / "cache.json"
    return {
        **os.environ,
        "ALIGN_FINGERPRINT_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "250",
    }  # unwrapped tables


def align(env, *args, timeout=1800):
    return subprocess.run(
        [*ALIGN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def finished(workdir: Path) -> dict[str, str]:
    return {name: json.loads((workdir / name / "stage.json").read_text())["finished_at"] for name in STAGES}


def touch_seconds():
    """stage.json timestamps have one-second resolution: let a second pass between runs."""
    time.sleep(1.1)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, env):
    """The one pipeline run of this module: the notebook, executed from examples/ as Jupyter would,
    on the recipe's `test` profile into a fresh workdir (both passed through its environment)."""
    import nbformat
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("quickstart") / "w"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute(env={**env, "ALIGN_NOTEBOOK_WORKDIR": str(workdir), "ALIGN_NOTEBOOK_PROFILE": "test"})
    return workdir, nb


def cell_output(nb, source_start: str) -> tuple[str, list[dict]]:
    """(the text the code cell starting with ``source_start`` printed or returned, its outputs)."""
    [cell] = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    text = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    return text, cell.outputs


def test_quickstart_notebook_runs_every_stage_and_shows_the_table(quickstart, env):
    workdir, nb = quickstart
    run = json.loads((workdir / "run.json").read_text())
    assert list(run["stages"]) == STAGES and run["exit_code"] == 0
    assert all(
        s["status"] == "done" and s["action"] == ("run" if s["reason"] == "new" else "overwrite")
        for s in run["stages"].values()
    )
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    plan, _ = cell_output(nb, "import pandas")
    assert [line.split()[1:4] for line in plan.splitlines()[1:]] == [
        [name, kind, "run"] for name, kind in ((n, run["stages"][n]["kind"]) for n in STAGES)
    ]
    ran, _ = cell_output(nb, "import time")
    kinds = {name: run["stages"][name]["kind"] for name in STAGES}
    assert [line for line in ran.splitlines() if line.startswith("align run:")] == [
        f"align run: {name} ({kinds[name]}): run (new)" for name in STAGES
    ]
    assert ran.splitlines()[-1].startswith("exit code 0 after ")

    status = json.loads(align(env, "status", workdir, "--json").stdout)
    assert [r["name"] for r in status] == STAGES and {r["status"] for r in status} == {"done"}
    by_name = {r["name"]: r for r in status}
    table, _ = cell_output(nb, "results = ")
    held = {}
    for i, name in enumerate(STAGES):  # the table's numbers come from each stage's stage.json
        [row] = [line.split() for line in table.splitlines() if line.split()[:2] == [str(i), name]]
        assert row[2:4] == [kinds[name], "done"]
    for name in EVALS:
        summary = json.loads((workdir / name / "stage.json").read_text())["summary"]
        held[name] = summary["mean_reward"]
        assert by_name[name]["metrics"]["held_out"] == held[name]
        assert summary["num_prompts"] == 16 and 0.0 <= held[name] <= 1.0
    first, last = held["eval_sft"], held["eval_rlhf"]
    summary_line, _ = cell_output(nb, "held = ")
    assert summary_line == (
        f"held-out exact match: {first:.3f} after eval_sft -> {last:.3f} after eval_rlhf"
        f" ({(last - first) * 100:+.1f} points)\n"
    )
    _, images = cell_output(nb, "from IPython.display")
    assert [sorted(o.data) for o in images] == [["image/png", "text/plain"]] * 2
    assert (
        by_name["rm"]["metrics"]["eval_accuracy"]
        == json.loads((workdir / "rm/stage.json").read_text())["summary"]["eval_accuracy"]
    )
    assert (
        by_name["rs"]["metrics"]["kept_rows"]
        == json.loads((workdir / "rs/stage.json").read_text())["summary"]["kept_rows"]
    )
    for name in STAGES:  # each stage ran in its own process, its output teed to its log
        assert (workdir / name / "log.txt").read_text().startswith("=== ")
    assert json.loads((workdir / "sft_rs/stage.json").read_text())["config"]["dataset"] == str(workdir / "rs" / "data")
    assert "sha256:" in json.dumps(json.loads((workdir / "sft/stage.json").read_text())["inputs"])


def test_rerun_is_a_fast_no_op(quickstart, env):
    workdir, _ = quickstart
    before = finished(workdir)
    logs = {name: (workdir / name / "log.txt").stat().st_size for name in STAGES}
    started = time.time()
    proc = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - started < 30
    assert finished(workdir) == before
    assert {name: (workdir / name / "log.txt").stat().st_size for name in STAGES} == logs  # no child started
    assert "align run:" not in proc.stdout
    for name in EVALS:  # the run ends with the status table, numbers from each eval's stage.json
        held = json.loads((workdir / name / "stage.json").read_text())["summary"]["mean_reward"]
        assert f"held_out {held:.3f}" in proc.stdout


def status_rows(env, workdir: Path) -> list[dict]:
    """`align status --json` without the fields that hold times or the workdir's own path."""
    rows = json.loads(align(env, "status", workdir, "--json").stdout)
    return [{k: v for k, v in row.items() if k not in ("duration_s", "finished_at", "dir")} for row in rows]


def runner(env, workdir: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "align", "run", str(QUICKSTART), "--profile", "test", "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )


def kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 900) -> bool:
    """SIGKILL the runner ``delay`` seconds after ``ready()`` holds; False if it ended first."""
    deadline = time.time() + timeout
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


def stage_running(workdir: Path, name: str, pid: int) -> bool:
    """Whether the runner ``pid`` (not a killed one before it) has started stage ``name``."""
    try:
        run = json.loads((workdir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return run.get("pid") == pid and run["stages"].get(name, {}).get("status") == "running"


def killed_before_stage_json(env, workdir: Path, log: Path, name: str) -> bool:
    """Run the recipe and SIGKILL the runner (its stage child dies with it) as soon as stage
    ``name`` has moved its model/ into place, before it writes its stage.json (a trainer draws its
    loss plot and hashes its outputs in between); whether the kill landed in that window."""
    print(f"kill -9 once {name} has written model/, before its stage.json")
    ready = lambda: (workdir / name / "model").is_dir()  # noqa: E731
    assert kill_when(runner(env, workdir, log), ready, 0.0), log.read_text()[-3000:]
    _children_gone(workdir)
    if (workdir / name / "stage.json").exists():
        return False
    rows = {row["name"]: row for row in status_rows(env, workdir)}
    assert rows[name]["status"] == "incomplete", rows[name]  # resumed on the next run, not taken as done
    return True


def test_killed_at_random_moments_the_run_ends_as_the_uninterrupted_one(quickstart, env, tmp_path):
    """The quickstart recipe killed with kill -9 at seeded random moments (as a stage starts, or
    just after a trainer's first checkpoint, when the next write may be under way) and between a
    trainer's model write and its stage.json, then stopped by SIGTERM during its last eval while a
    second run finds the workdir locked, and rerun until done: the same status table, final model
    (bitwise), rs rows and per-step metrics as the notebook's run, which was never stopped."""
    calm, _ = quickstart
    seed = int(os.environ.get("ALIGN_KILL_SEED", random.randrange(10**6)))
    print(f"kill seed {seed} (ALIGN_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    work, log = tmp_path / "w", tmp_path / "runner.log"
    trainers = ["sft", "rm", "sft_rs", "dpo", "rlhf"]
    for name in [*sorted(rng.sample(["sft", "rm", "rs", "sft_rs", "rs_pairs", "dpo"], 2), key=STAGES.index), "rlhf"]:
        if name == "rlhf":  # dpo, finished but for its stage.json: the rerun must not take it as done
            between = killed_before_stage_json(env, work, log, "dpo")
        at_checkpoint = name in trainers and rng.random() < 0.5
        delay = rng.uniform(0.0, 0.5 if at_checkpoint else 3.0)
        print(f"kill -9 {delay:.2f} s after {name} {'writes its first checkpoint' if at_checkpoint else 'starts'}")
        if at_checkpoint:
            ready = lambda d=work / name / "checkpoints": any(d.glob("checkpoint-*/*.json"))  # noqa: E731
        else:
            ready = lambda d=work / name: (d / "log.txt").is_file()  # noqa: E731
        assert kill_when(runner(env, work, log), ready, delay) or name != "rlhf", log.read_text()[-3000:]
        _children_gone(work)
        for row in status_rows(env, work):  # a stage with a stage.json has every output it recorded
            assert row["status"] != "stale", row
    if not between:  # dpo wrote its stage.json before the kill landed: the same kill at rlhf's end
        assert killed_before_stage_json(env, work, log, "rlhf"), "both kills missed model/ without stage.json"

    first = runner(env, work, log)
    deadline = time.time() + 900
    while not stage_running(work, "eval_rlhf", first.pid):
        assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # the runner holds the lock however long the second run takes to start
    second = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", work)
    assert second.returncode == 75 and "is in use by another align run" in second.stderr, second.stderr
    first.send_signal(signal.SIGTERM)  # eval has no safe point: it finishes, then the run exits 3
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 3, log.read_text()[-3000:]
    assert json.loads((work / "run.json").read_text())["stages"]["eval_rlhf"]["status"] == "interrupted"
    final = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", work)
    assert final.returncode == 0, final.stdout[-3000:] + log.read_text()[-3000:]

    assert status_rows(env, work) == status_rows(env, calm)
    for name in ("sft", "rlhf"):
        got, want = (
            load_file(work / name / "model" / "model.safetensors"),
            load_file(calm / name / "model" / "model.safetensors"),
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    for name in ("rs", "rs_pairs"):  # the same candidates (each row names its model: a path in its own workdir)
        rows = [
            [{k: v for k, v in r.items() if k != "model"} for r in read_jsonl(w / name / "candidates.jsonl")]
            for w in (work, calm)
        ]
        assert rows[0] == rows[1], name
    clock = ("time", "per_s", "seconds", "runtime")
    for name in trainers:  # every step once, with the losses and rewards of the run never stopped
        rows = [
            [
                {k: v for k, v in r.items() if not any(c in k for c in clock)}
                for r in read_jsonl(w / name / "metrics.jsonl")
                if "train_loss" not in r
            ]
            for w in (work, calm)
        ]
        assert rows[0] == rows[1], name

    # a finished stage's model cut short: stale, with the file named, and so is every stage after it
    weights = work / "sft_rs" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    rows = {r["name"]: r for r in status_rows(env, work)}
    assert rows["sft_rs"]["status"] == "stale"
    assert rows["sft_rs"]["why"] == f"output changed: model/model.safetensors has {size // 2} bytes, {size} recorded"
    assert rows["eval_sft_rs"]["status"] == "stale" and rows["eval_sft_rs"]["why"] == "upstream sft_rs reruns"
    assert rows["sft"]["status"] == "done"
    plan = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", work, "--dry-run").stdout
    assert "overwrite" in plan and "output changed" in plan


def test_set_reruns_exactly_that_stage_and_its_consumers(quickstart, env):
    workdir, _ = quickstart
    dry = align(
        env,
        "run",
        QUICKSTART,
        "--profile",
        "test",
        "--workdir",
        workdir,
        "--set",
        "rlhf.num_iterations=3",
        "--dry-run",
    )
    assert dry.returncode == 0
    assert "config changed: num_iterations: 2 -> 3" in dry.stdout and "upstream rlhf reruns" in dry.stdout
    before = finished(workdir)
    touch_seconds()
    proc = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", workdir, "--set", "rlhf.num_iterations=3")
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = finished(workdir)
    assert [n for n in STAGES if after[n] != before[n]] == ["rlhf", "eval_rlhf"]
    assert [r["step"] for r in read_jsonl(workdir / "rlhf" / "metrics.jsonl")] == [1, 2, 3]
    # status loads the recipe with the last run's --set values: rlhf is up to date for it
    status = {r["name"]: r for r in json.loads(align(env, "status", workdir, "--json").stdout)}
    assert status["rlhf"]["status"] == "done"


def test_an_edited_output_file_is_redone_from_its_stage(quickstart, env):
    """A finished stage's output edited by hand no longer matches what its stage.json recorded: the
    stage shows stale with the reason, and the next run redoes it, putting the recorded file back."""
    workdir, _ = quickstart
    test_file = workdir / "data" / "data" / "test.jsonl"
    original = test_file.read_bytes()
    rows = test_file.read_text().splitlines()
    test_file.write_text("\n".join(rows[:12]) + "\n")
    status = {r["name"]: r for r in json.loads(align(env, "status", workdir, "--json").stdout)}
    assert status["data"]["status"] == "stale" and "output changed: data/test.jsonl" in status["data"]["why"]
    touch_seconds()
    proc = align(env, "run", QUICKSTART, "--profile", "test", "--workdir", workdir, "--set", "rlhf.num_iterations=3")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert test_file.read_bytes() == original
    status = {r["name"]: r for r in json.loads(align(env, "status", workdir, "--json").stdout)}
    assert {r["status"] for r in status.values()} == {"done"}
    assert json.loads((workdir / "eval_sft" / "stage.json").read_text())["summary"]["num_prompts"] == len(rows)


def test_report_writes_plots_and_summary(quickstart, env):
    workdir, _ = quickstart
    proc = align(env, "report", workdir)
    assert proc.returncode == 0, proc.stderr
    report = workdir / "report"
    assert (report / "heldout.png").stat().st_size > 1000 and (report / "rewards.png").stat().st_size > 1000
    text = (report / "report.md").read_text()
    held = json.loads((workdir / "eval_rlhf" / "stage.json").read_text())["summary"]["mean_reward"]
    assert f"| eval_rlhf | eval | done | held_out {held:.3f} |" in text
    assert "Held-out score:" in text and "![heldout](heldout.png)" in text


# -- real kills -------------------------------------------------------------------------------------


def _single_stage_recipe(path: Path, workdir: Path, stage: str) -> Path:
    path.write_text(f"workdir: {workdir}\nstages:\n{stage}")
    return path


def start_runner(recipe: Path, env, tmp_path: Path) -> subprocess.Popen:
    """`align run RECIPE` in the background, its output to a file (a full pipe would block it)."""
    with open(tmp_path / "runner.log", "w") as log:
        return subprocess.Popen([*ALIGN, "run", str(recipe)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _children_gone(workdir: Path, timeout: float = 30) -> None:
    """The stage child died with the runner (PR_SET_PDEATHSIG): nothing writes into the workdir any more."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"a child of the killed runner still runs: {out}")


def test_sigterm_during_sft_exits_3_and_the_rerun_resumes(quickstart, env, tmp_path):
    workdir, _ = quickstart
    recipe = _single_stage_recipe(
        tmp_path / "sft.yaml",
        tmp_path / "w",
        textwrap_stage(
            "sft",
            "sft",
            model_name_or_path=workdir / "tiny" / "model",
            dataset=workdir / "data" / "data" / "sft.jsonl",
            max_steps=400,
            save_steps=5,
            per_device_train_batch_size=8,
            logging_steps=5,
        ),
    )
    proc = start_runner(recipe, env, tmp_path)
    checkpoints = tmp_path / "w" / "sft" / "checkpoints"
    deadline = time.time() + 900
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):  # a whole checkpoint
        assert proc.poll() is None, (tmp_path / "runner.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    assert proc.wait(timeout=120) == 3, (tmp_path / "runner.log").read_text()[-3000:]
    assert time.time() - sent < 120
    assert "interrupted during stage 'sft'" in (tmp_path / "runner.log").read_text()
    assert any(checkpoints.glob("checkpoint-*")) and not (tmp_path / "w" / "sft" / "stage.json").exists()
    assert json.loads((tmp_path / "w" / "run.json").read_text())["stages"]["sft"]["status"] == "interrupted"
    rerun = align(env, "run", recipe)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert json.loads((tmp_path / "w" / "sft" / "stage.json").read_text())["summary"]["resumed_from_step"] >= 5


def textwrap_stage(name: str, kind: str, **keys) -> str:
    body = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return f"  - name: {name}\n    kind: {kind}\n{body}"
