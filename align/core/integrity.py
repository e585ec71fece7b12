"""Whether files a stage wrote are still whole: cheap structural checks, and the digests a finished
stage records of its own outputs.

1. ``file_problem(path)`` reads no tensor: a safetensors file must be as long as its header says
   (8 bytes, the JSON header, then the last tensor's end offset), a torch archive (``*.pt``,
   ``*.pth``, ``*.bin`` zip files) must have its central directory (written last, at the end), and a
   JSON file must parse. A file cut short by a full disk, a kill during a copy or a bad transfer
   fails one of these. ``align.core.stage_dir`` skips a checkpoint holding such a file, and refuses to
   start a stage on an input model folder holding one.
2. ``output_digests(dir)``: ``Stage.finish`` records, in stage.json under ``outputs``, the size
   and sha256 of every file in the stage's artifacts (``OUTPUTS``). The digests come from the
   fingerprint cache (``align.core.fingerprint.DigestCache``, keyed by path, size and mtime), so checking
   an unchanged output later reads nothing, and the next stage's input fingerprint of that folder
   reads nothing either.
3. ``output_changes(dir, recorded)``: what no longer matches: a file missing, of another size, or
   (size and mtime changed, so hashed again) of other content. ``align.core.stage_dir.stage_state`` then
   calls the stage ``output_changed`` (``align run`` redoes it; ``align status`` shows it stale),
   and a later stage reading that folder fails naming the file (``check_input_paths``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Iterable

from align.core.errors import ArtifactError
from align.core.fingerprint import DigestCache

# What a stage dir holds as its result (folders and files): the only paths ``outputs`` records.
OUTPUTS = ("model", "data", "adapter", "merged", "eval.jsonl", "candidates.jsonl")
_ZIP_SUFFIXES = (".pt", ".pth", ".bin")


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` is not whole (None when its length matches its header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut short ({size} bytes, shorter than a safetensors header)"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"cut short ({size} bytes; its header alone needs {8 + length})"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its safetensors header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"cut short ({size} bytes; its header describes {expected})"
    return f"{size} bytes, its header describes {expected}" if size > expected else None


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole file of its kind (safetensors, torch zip archive, JSON), or None."""
    try:
        if path.suffix == ".safetensors":
            return safetensors_problem(path)
        if path.suffix in _ZIP_SUFFIXES:
            with open(path, "rb") as f:
                if f.read(2) != b"PK":  # a legacy pickle: nothing cheap to check
                    return None
            with zipfile.ZipFile(path):
                return None
        if path.suffix == ".json":
            json.loads(path.read_text())
    except zipfile.BadZipFile:
        return "cut short (a torch archive without its end record)"
    except (ValueError, UnicodeDecodeError):
        return "not whole JSON"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None


def folder_problems(folder: Path) -> list[tuple[Path, str]]:
    """(file, problem) for every file directly in ``folder`` that ``file_problem`` finds fault with."""
    found = []
    for path in sorted(folder.iterdir()):
        problem = file_problem(path) if path.is_file() else None
        if problem:
            found.append((path, problem))
    return found


def _output_files(stage_dir: Path) -> Iterable[Path]:
    for name in OUTPUTS:
        path = stage_dir / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(stage_dir).parts)
            )


def output_digests(stage_dir: Path, cache: DigestCache | None = None) -> dict[str, dict[str, Any]]:
    """{path relative to the stage dir: {size, sha256}} for every file of the stage's ``OUTPUTS``."""
    own = cache is None
    cache = cache or DigestCache()
    found = {
        p.relative_to(stage_dir).as_posix(): {"size": p.stat().st_size, "sha256": cache.file_digest(p)}
        for p in _output_files(stage_dir)
    }
    if own:
        cache.save()
    return found


def output_changes(
    stage_dir: Path, recorded: dict[str, dict[str, Any]], under: str = "", cache: DigestCache | None = None
) -> list[str]:
    """What differs between the recorded outputs (those under ``under``, a relative folder or file;
    all when empty) and the files now there, one phrase per file; empty when all match."""
    own = cache is None
    cache = cache or DigestCache()
    changes = []
    for rel, want in sorted(recorded.items()):
        if under and rel != under and not rel.startswith(under.rstrip("/") + "/"):
            continue
        path = stage_dir / rel
        if not path.is_file():
            changes.append(f"{rel} is missing, recorded")
        elif path.stat().st_size != want["size"]:
            changes.append(f"{rel} has {path.stat().st_size} bytes, {want['size']} recorded")
        elif cache.file_digest(path) != want["sha256"]:
            changes.append(f"{rel} has other content than recorded")
    if own:
        cache.save()
    return changes


def _input_paths(config: Any) -> Iterable[Path]:
    record = getattr(config, "recorded", lambda name, value: value)
    for name in getattr(config, "inputs", ()):
        value = record(name, getattr(config, name, None))
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                path = Path(item.removeprefix("model:")).expanduser()
                if path.exists():
                    yield path


def _recording_stage(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The finished stage dir whose recorded outputs include ``path`` (``path`` itself or an ancestor
    up to two levels up: ``W/sft/model``, ``W/data/data/sft.jsonl``), with its ``outputs``; None if none."""
    resolved = path.resolve()
    for parent in [resolved, *list(resolved.parents)[:2]]:
        try:
            record = json.loads((parent / "stage.json").read_text())
        except (OSError, ValueError):
            continue
        outputs = record.get("outputs") if isinstance(record, dict) else None
        if isinstance(outputs, dict):
            return parent, outputs
    return None


def check_input_paths(config: Any, cache: DigestCache | None = None) -> None:
    """Fail (``ArtifactError``, exit 2) naming the file when a local input of ``config`` is not
    whole: it no longer matches what the stage that wrote it recorded, or a weight file in an input
    folder is cut short. Called before a stage loads anything."""
    for path in _input_paths(config):
        found = _recording_stage(path)
        if found is not None:
            stage_dir, outputs = found
            rel = path.resolve().relative_to(stage_dir).as_posix().removeprefix(".")
            changes = output_changes(stage_dir, outputs, under=rel, cache=cache)
            if changes:
                more = f" (and {len(changes) - 1} more files)" if len(changes) > 1 else ""
                raise ArtifactError(
                    f"{stage_dir}/{changes[0]} when stage {stage_dir} finished{more}: its output is"
                    f" damaged or replaced; rerun that stage (align run redoes it) before using {path}"
                )
        for file, problem in folder_problems(path) if path.is_dir() else []:
            if file.suffix == ".safetensors":
                raise ArtifactError(
                    f"{file} is {problem}; rewrite it (rerun the stage that made it) before using {path}"
                )
