"""User-facing errors and the exit codes schedulers rely on.

Anything a user can fix (bad flags, bad config, malformed data, a missing model) raises an
``AlignError``. The CLI turns it into one line on stderr and exit code 2, with no traceback
unless ``--debug`` is given. Internal bugs stay ordinary exceptions.

Exit codes (every command, ``align run`` included; cron wrappers and Slurm scripts branch on them):

====  ==================  ======================================================================
0     ``EXIT_OK``          done (or nothing to do: every stage was already up to date)
1     ``EXIT_FAILED``      a stage failed with an internal error (the traceback is shown), or a write
                           failed for want of space (``WriteError``: one line names the file)
2     ``EXIT_USAGE``       bad recipe, config, data or path: one line says what and where
3     ``EXIT_INTERRUPTED`` stopped by SIGTERM/SIGUSR1 (or Ctrl-C) at a safe point after writing a
                           checkpoint; rerunning the same command resumes from it
75    ``EXIT_LOCKED``      another run holds the workdir's lock (sysexits EX_TEMPFAIL): try later
====  ==================  ======================================================================
"""

from __future__ import annotations

import difflib
import errno
from typing import Iterable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_LOCKED = 75


class AlignError(Exception):
    """A problem the user can fix. ``str(err)`` is the one-line message shown to them."""

    exit_code = EXIT_USAGE


class ConfigError(AlignError):
    """Unknown key, wrong type, missing required value, conflicting options."""


class DataError(AlignError):
    """Malformed or unusable dataset: names the file (and line or row) and how to fix it."""


class ModelError(AlignError):
    """A model or tokenizer that cannot be found or loaded."""


class Interrupted(AlignError):
    """A stop asked for by a signal, honoured at a safe point after a checkpoint was written."""

    exit_code = EXIT_INTERRUPTED


class Locked(AlignError):
    """Another process holds the lock of the stage dir or workdir."""

    exit_code = EXIT_LOCKED


class ArtifactError(AlignError):
    """A file an earlier stage or run wrote that is cut short or no longer matches its record."""


class WriteError(AlignError):
    """A write that failed because the disk, a quota or a file-size limit is full: names the file.

    Not the user's input, but not a bug either: one line and ``EXIT_FAILED``, and rerunning the
    same command once space is freed continues from what was whole before the write."""

    exit_code = EXIT_FAILED


# errno values that mean "no room to write", and the words the libraries that write checkpoints
# without an OSError (safetensors' serializer, torch's zip writer) put in their messages instead.
FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "file too large", "disk quota exceeded", "file write failed")


def write_fault(err: BaseException) -> str | None:
    """The cause, in words, when ``err`` (or an exception it was raised from) is a write that failed
    for want of space; None for anything else."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return seen.strerror or str(seen)
        text = str(seen).lower()
        for words in FULL_WORDS:
            if words in text:
                return words.capitalize()
        seen = seen.__cause__ or seen.__context__
    return None


def did_you_mean(word: str, options: Iterable[str], template: str = " (did you mean '{}'?)") -> str:
    """``template`` filled with the option closest to ``word`` (difflib, cutoff 0.6), or "" when
    none is close: the hint that ends an error about an unknown name."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return template.format(close[0]) if close else ""


def first_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of ``str(err)``, for a one-line message; for an error with no text, ``empty``
    (by default the error's type name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if empty is None else empty
