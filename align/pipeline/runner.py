"""Running a recipe: the workdir lock, one child process per stage, and ``<workdir>/run.json``.

Each stage that is not up to date runs as ``python -m align <kind> --config <stage dir>/config.yaml``
so vLLM and torch state never leak from one stage into the next. The child dies with the runner
(Linux ``PR_SET_PDEATHSIG``), so a ``kill -9`` of ``align run`` never leaves a stage writing into
a workdir that the next run is about to use. SIGTERM, SIGUSR1 and SIGINT are forwarded to the
child (which checkpoints at its next safe point and exits ``EXIT_INTERRUPTED``); the run then
exits ``EXIT_INTERRUPTED`` too, and the next run resumes the stage through its own resume support.

One run per workdir: an flock-based ``filelock.UnixFileLock`` on ``<workdir>/.align-run.lock``,
released by the kernel when its holder dies (no stale lock to delete after a kill, unlike DVC's
or Snakemake's), with the holder's pid, host and start time in ``.align-run.holder.json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from align.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, Locked
from align.core.fingerprint import input_fingerprints
from align.core.stage_dir import Stage, atomic_write_json
from align.pipeline.plan import Pipeline, wrapped

LOCK_FILE = ".align-run.lock"
HOLDER_FILE = ".align-run.holder.json"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------


def holder(workdir: Path) -> dict[str, Any] | None:
    """The live holder of the workdir lock ({pid, host, started_at}), or None when it is free."""
    from filelock import Timeout, UnixFileLock

    if not (workdir / LOCK_FILE).exists():
        return None
    probe = UnixFileLock(str(workdir / LOCK_FILE))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        try:
            return json.loads((workdir / HOLDER_FILE).read_text())
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started_at": "?"}
    probe.release()
    return None


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the run lock or raises ``Locked`` naming the holder."""

    def __init__(self, workdir: Path):
        from filelock import UnixFileLock

        self.workdir = workdir
        self.lock = UnixFileLock(str(workdir / LOCK_FILE))

    def __enter__(self) -> "WorkdirLock":
        from filelock import Timeout

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                info = json.loads((self.workdir / HOLDER_FILE).read_text())
            except (OSError, ValueError):
                info = {}
            raise Locked(
                f"{self.workdir} is in use by another align run (pid {info.get('pid', '?')} on {info.get('host', '?')},"
                f" started {info.get('started_at', '?')}); try again when it ends (exit code {EXIT_LOCKED})"
            ) from None
        atomic_write_json(
            self.workdir / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso()}
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when the runner dies (even by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the lock still keeps a second run out while the runner lives
        pass


class ChildRunner:
    """Runs one stage child at a time, teeing its output to a log, forwarding signals to it."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.child: subprocess.Popen | None = None
        self.signalled: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.signalled = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"=== {now_iso()} {' '.join(argv)}\n")
            out.flush()
            self.child = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
            assert self.child.stdout is not None
            for line in self.child.stdout:
                out.write(line)
                out.flush()
                self.echo(line.rstrip("\n"))
            code = self.child.wait()
        self.child = None
        return code


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def child_config(recipe: Pipeline, name: str, action: str) -> dict[str, Any]:
    """The YAML the stage child gets: the stage's full resolved config plus overwrite/resume."""
    config = recipe.config(name)
    values = config.resolved()
    fields = set(values)
    if "overwrite" in fields:
        values["overwrite"] = action == "overwrite"
    if "resume" in fields:
        values["resume"] = action == "resume"
    return values


class Run:
    """One ``align run``: decide each stage just before it runs, run it, record run.json."""

    def __init__(
        self,
        recipe: Pipeline,
        force: list[str] | tuple[str, ...] = (),
        echo: Callable[[str], None] = print,
        only: str | None = None,
    ):
        self.recipe = recipe
        self.force = recipe._check_force(force)
        self.echo = echo
        self.only = only
        self.children = ChildRunner(echo)
        self.record: dict[str, Any] = {}

    def _save(self) -> None:
        atomic_write_json(self.recipe.workdir / RUN_FILE, self.record)

    def execute(self) -> int:
        with WorkdirLock(self.recipe.workdir):
            previous = {sig: signal.signal(sig, self.children.handle) for sig in FORWARDED}
            try:
                return self._stages()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _stages(self) -> int:
        recipe = self.recipe
        self.record = {
            "recipe": str(recipe.path.resolve()),
            "recipe_from_workdir": os.path.relpath(recipe.path.resolve(), recipe.workdir.resolve()),
            "workdir": str(recipe.workdir),
            "cwd": os.getcwd(),  # relative paths in the stage configs are from here
            "profile": recipe.profile,
            "sets": recipe.sets,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": now_iso(),
            "finished_at": None,
            "exit_code": None,
            "stages": {s.name: {"kind": s.kind, "status": "pending"} for s in recipe.stages},
        }
        self._save()
        rerun: set[str] = set()
        code = EXIT_OK
        for spec in recipe.stages:
            if self.only is not None and self.only not in (spec.name, spec.base):
                continue
            entry = self.record["stages"][spec.name]
            decision = recipe.decide(spec.name, rerun, self.force)
            entry.update(action=decision["action"], reason=decision["reason"])
            if decision["action"] == "skip":
                entry["status"] = "done"
                self._save()
                continue
            if self.children.signalled is not None:  # a signal between stages: start nothing new
                code = EXIT_INTERRUPTED
                break
            rerun.add(spec.name)
            self.echo(f"align run: {spec.name} ({spec.kind}): {decision['action']} ({decision['reason']})")
            code = self._run_stage(spec.name, decision["action"], entry)
            if code != EXIT_OK:
                break
        self.record.update(finished_at=now_iso(), exit_code=code)
        self._save()
        return code

    def _run_stage(self, name: str, action: str, entry: dict[str, Any]) -> int:
        recipe, spec = self.recipe, self.recipe.by_name[name]
        stage_dir = recipe.stage_dir(name)
        values = child_config(recipe, name, action)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / CONFIG_FILE).write_text(yaml.safe_dump(values, sort_keys=False))
        bare = _wrapped_stage(recipe, name, action)  # None: the stage writes its own stage.json
        entry.update(status="running", started_at=now_iso(), log=str(stage_dir / LOG_FILE), pid=os.getpid())
        self._save()
        started = time.time()
        argv = [sys.executable, "-m", "align", spec.kind, "--config", str(stage_dir / CONFIG_FILE)]
        code = self.children.run(argv, stage_dir / LOG_FILE)
        entry.update(finished_at=now_iso(), duration_s=round(time.time() - started, 2), exit_code=code)
        if code == EXIT_OK and bare is not None:
            bare.finish({}, {str(wrapped(spec.kind)): values["output_dir"]})
        if code == EXIT_OK and self.children.signalled is None:
            entry["status"] = "done"
            self._save()
            return EXIT_OK
        if code == EXIT_INTERRUPTED or self.children.signalled is not None:
            entry["status"] = "interrupted"
            self.echo(f"align run: interrupted during stage '{name}'; rerun the same command to continue it")
            self._save()
            return EXIT_INTERRUPTED
        entry["status"] = "failed"
        self._save()
        self.echo(f"align run: stage '{name}' ({spec.kind}) failed with exit code {code}; see {stage_dir / LOG_FILE}")
        return code if code in (EXIT_USAGE, EXIT_LOCKED) else EXIT_FAILED


def _wrapped_stage(recipe: Pipeline, name: str, action: str) -> Stage | None:
    """For kinds without a stage contract (``wrapped``): clear on overwrite; the runner writes stage.json."""
    spec = recipe.by_name[name]
    if wrapped(spec.kind) is None:
        return None
    stage = Stage(spec.kind, recipe.config(name), recipe.stage_dir(name))
    if action == "overwrite":
        stage.clear()
    stage.inputs = input_fingerprints(stage.config)
    return stage
