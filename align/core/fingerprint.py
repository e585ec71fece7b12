"""Fingerprints of a stage's inputs: what ``align.core.stage_dir`` compares, besides the config, to decide
whether a finished stage dir still holds the result of this run.

A file's fingerprint is the sha256 of its content; a folder's combines its files' (relative path
and digest, sorted; dotfiles skipped); anything that is not an existing path (a Hub id, ``rule:NAME``,
``module:function``) is the string itself. A scorer spec ``model:PATH`` fingerprints PATH.

Hashing gigabytes on every no-op rerun is the fault DVC users report most (a ``repro`` that does
nothing still takes minutes), so digests are cached by (absolute path, size, mtime_ns) in
``$XDG_CACHE_HOME/align/fingerprints.json`` (``ALIGN_FINGERPRINT_CACHE`` overrides the path),
written atomically. A changed size or mtime means the file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_PREFIXES = ("model:",)  # specs whose rest is a path: fingerprint that path


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/align/NAME`` (``~/.cache/align/NAME`` by default): where the toolkit keeps
    what it can compute again (digests, converted GGUF models, reference log-probs)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "align" / name


def cache_path() -> Path:
    if os.environ.get("ALIGN_FINGERPRINT_CACHE"):
        return Path(os.environ["ALIGN_FINGERPRINT_CACHE"])
    return cache_dir("fingerprints.json")


class DigestCache:
    """sha256 of files, remembered by (path, size, mtime_ns); ``save()`` writes it back if it grew."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False
        self.hashed = 0  # files actually read (tests assert a no-op rerun reads none)

    def file_digest(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = self.entries.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
            digest = self.entries[key] = h.hexdigest()
            self.dirty = True
            self.hashed += 1
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fingerprints.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:  # a read-only cache dir only costs speed
            pass


def fingerprint(value: Any, cache: DigestCache) -> Any:
    """The fingerprint of one input value (a string, a list of them, or None)."""
    if isinstance(value, list):
        return [fingerprint(v, cache) for v in value]
    if not isinstance(value, str) or not value:
        return value
    prefix = next((p for p in _PREFIXES if value.startswith(p)), "")
    path = Path(value[len(prefix) :]).expanduser()
    if path.is_file():
        return f"{prefix}sha256:{cache.file_digest(path)}"
    if path.is_dir():
        return f"{prefix}tree:{_tree_digest(path, cache)}"
    return value


def _tree_digest(root: Path, cache: DigestCache) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{cache.file_digest(path)}\n".encode())
    return h.hexdigest()


def input_fingerprints(config: Any, cache: DigestCache | None = None) -> dict[str, Any]:
    """{field: fingerprint} for every field the config class declares in ``inputs``."""
    own = cache is None
    cache = cache or DigestCache()
    record = getattr(config, "recorded", lambda name, value: value)
    found = {name: fingerprint(record(name, getattr(config, name)), cache) for name in getattr(config, "inputs", ())}
    if own:
        cache.save()
    return found
