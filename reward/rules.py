"""Rule rewards: plain Python functions that score a response, registered by name.

A rule has the signature ``fn(prompt: str, response: str, **columns) -> float``: ``prompt`` is
the user's prompt text, ``response`` the model's decoded response text and ``columns`` the other
columns of the dataset row (e.g. ``answer``). Register one with ``@register_rule("name")`` and look
it up with ``get_rule("name")``; a scorer spec names it as ``rule:NAME``.

Rules read their parameters from the row, so one spec string serves a whole dataset whose rows
differ: ``exact_match`` (also registered as ``arithmetic``, the name the demo configs use) reads
``answer``, ``regex`` reads ``pattern``, and ``length_penalty`` reads ``max_chars`` (optional).

Two sentiment judges from published lexicons score the response text alone: ``vader`` (VADER's
compound score in [-1, 1], Hutto & Gilbert 2014, the ``vaderSentiment`` package) and ``afinn``
(the AFINN-165 word valences summed, Nielsen 2011, the ``afinn`` package). They stand in for
people's taste in the synthetic-gold protocol (configs/recipes/smollm2_gold.yaml); neither package
is imported until its rule is first used, and a missing one is a one-line error naming the extra.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Callable

from align.core.errors import ConfigError, DataError
from align.core.registry import Registry

Rule = Callable[..., float]

RULES: Registry[Rule] = Registry("reward rule")
register_rule = RULES.register  # @register_rule("name"); a name already taken is a ValueError
get_rule = RULES.get  # an unknown name is a ConfigError listing the valid ones


def _column(rule: str, columns: dict, column: str, what: str = "the reference answer"):
    if column not in columns or columns[column] is None:
        have = ", ".join(sorted(columns)) or "none"
        article = "an" if column[0] in "aeiou" else "a"
        raise DataError(f"rule {rule!r} needs {article} {column!r} column with {what} (the row has: {have})")
    return columns[column]


@register_rule("arithmetic")  # the demo's sums: the answer is the number, nothing around it
@register_rule("exact_match")
def exact_match(prompt: str, response: str, **columns) -> float:
    """1.0 when the stripped response equals the stripped ``answer`` column, else 0.0."""
    answer = _column("exact_match", columns, "answer")
    return 1.0 if response.strip() == str(answer).strip() else 0.0


@register_rule("regex")
def regex(prompt: str, response: str, **columns) -> float:
    """1.0 when the row's ``pattern`` (a Python regular expression) matches anywhere in the
    response (``re.search``; anchor it with ``^...$`` for a whole-response match), else 0.0."""
    pattern = _column("regex", columns, "pattern", "a regular expression")
    try:
        return 1.0 if re.search(str(pattern), response) else 0.0
    except re.error as err:
        raise DataError(f"rule 'regex': invalid pattern {pattern!r} ({err}); fix the row's 'pattern' column") from None


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]*)")


def final_number(text: str) -> float | None:
    """The final numeric answer in free text: inside the last ``\\boxed{}``, else after the last
    ``####`` (GSM8K's marker), else the last number anywhere; thousands commas allowed
    ("1,234"). None when there is no number. Numbers in words ("sixty-eight") are not read."""
    for marker in (_BOXED, _HASHES):
        found = marker.findall(text)
        if found:
            text = found[-1]
            break
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


@register_rule("numeric_answer")
def numeric_answer(prompt: str, response: str, **columns) -> float:
    """1.0 when the response's final number (``final_number``: ``\\boxed{}``, ``####``, else the
    last number) equals the ``answer`` column's numerically ("68.0" == "68"), else 0.0. For
    chat models that answer in sentences ("The answer is 68."), where ``arithmetic`` needs the
    bare number. TRL's accuracy reward uses math-verify (LaTeX/sympy equivalence) instead;
    we compare plain numbers, which needs no parser dependency."""
    answer = _column("numeric_answer", columns, "answer")
    expected = final_number(str(answer))
    if expected is None:
        raise DataError(f"rule 'numeric_answer': the 'answer' column {answer!r} holds no number")
    got = final_number(response)
    return 1.0 if got is not None and abs(got - expected) <= 1e-9 * max(1.0, abs(expected)) else 0.0


DEFAULT_MAX_CHARS = 1000


@register_rule("length_penalty")
def length_penalty(prompt: str, response: str, **columns) -> float:
    """0.0 up to ``max_chars`` characters (the row's column, else ``DEFAULT_MAX_CHARS``), then
    minus the overflow as a fraction of ``max_chars``: -(len - max_chars) / max_chars. Add it
    to another scorer in a committee to discourage verbosity."""
    max_chars = columns.get("max_chars")
    max_chars = DEFAULT_MAX_CHARS if max_chars is None else int(max_chars)
    if max_chars <= 0:
        raise DataError(f"rule 'length_penalty': 'max_chars' must be positive, got {max_chars}")
    return -max(0, len(response) - max_chars) / max_chars


@functools.cache
def _judge(module: str, attr: str, package: str):
    """The lexicon scorer object of a judge package, built once per process."""
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ConfigError(f"this rule needs the {package} package: pip install -e '.[judges]'") from None
    return cls()


@register_rule("vader")
def vader(prompt: str, response: str, **columns) -> float:
    """VADER's compound sentiment of the response, in [-1, 1] (Hutto & Gilbert 2014)."""
    return float(
        _judge("vaderSentiment.vaderSentiment", "SentimentIntensityAnalyzer", "vaderSentiment").polarity_scores(
            response
        )["compound"]
    )


@register_rule("afinn")
def afinn(prompt: str, response: str, **columns) -> float:
    """The response's AFINN-165 word valences (-5..5 each), summed (Nielsen 2011)."""
    return float(_judge("afinn", "Afinn", "afinn").score(response))


__all__ = [
    "DEFAULT_MAX_CHARS",
    "RULES",
    "Rule",
    "afinn",
    "exact_match",
    "final_number",
    "get_rule",
    "length_penalty",
    "numeric_answer",
    "regex",
    "register_rule",
    "vader",
]
