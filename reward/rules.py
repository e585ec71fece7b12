"""Rule rewards: plain Python functions that score a response, registered by name.

A rule has the signature ``fn(prompt: str, response: str, **columns) -> float``: ``prompt`` is
the user's prompt text, ``response`` the model's decoded response text and ``columns`` the other
columns of the dataset row (e.g. ``answer``). Register one with ``@register_rule("name")`` and look
it up with ``get_rule("name")``.
"""

from __future__ import annotations

import difflib
from typing import Callable

from align.errors import ConfigError, DataError

Rule = Callable[..., float]

RULES: dict[str, Rule] = {}


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Decorator adding a rule to ``RULES`` under ``name``; a name already taken is a ValueError."""

    def decorator(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"rule {name!r} is already registered (by {RULES[name].__qualname__})")
        RULES[name] = fn
        return fn

    return decorator


def get_rule(name: str) -> Rule:
    """The rule registered as ``name``; an unknown name is a ConfigError listing the valid ones."""
    try:
        return RULES[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(str(name), RULES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    valid = ", ".join(sorted(RULES))
    raise ConfigError(f"unknown reward rule {name!r}{hint}; valid: {valid}")


def _column(rule: str, columns: dict, column: str):
    if column not in columns or columns[column] is None:
        have = ", ".join(sorted(columns)) or "none"
        raise DataError(
            f"rule {rule!r} needs an {column!r} column with the reference answer "
            f"(the row has: {have})"
        )
    return columns[column]


@register_rule("exact_match")
def exact_match(prompt: str, response: str, **columns) -> float:
    """1.0 when the stripped response equals the stripped ``answer`` column, else 0.0."""
    answer = _column("exact_match", columns, "answer")
    return 1.0 if response.strip() == str(answer).strip() else 0.0


@register_rule("arithmetic")
def arithmetic(prompt: str, response: str, **columns) -> float:
    """1.0 when the response (stripped) is exactly the ``answer`` column's number, else 0.0."""
    answer = _column("arithmetic", columns, "answer")
    return 1.0 if response.strip() == str(answer).strip() else 0.0


__all__ = ["RULES", "Rule", "arithmetic", "exact_match", "get_rule", "register_rule"]
