"""User-facing errors.

Anything a user can fix (bad flags, bad config, malformed data, a missing model) raises an
``AlignError``. The CLI turns it into one line on stderr and exit code 2, with no traceback
unless ``--debug`` is given. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


class AlignError(Exception):
    """A problem the user can fix. ``str(err)`` is the one-line message shown to them."""

    exit_code = 2


class ConfigError(AlignError):
    """Unknown key, wrong type, missing required value, conflicting options."""


class DataError(AlignError):
    """Malformed or unusable dataset: names the file (and line or row) and how to fix it."""


class ModelError(AlignError):
    """A model or tokenizer that cannot be found or loaded."""
