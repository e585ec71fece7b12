"""Scorers: text in, floats out. One protocol for rules, user functions and (later) reward models.

A scorer sees the decoded prompt and response text, never token ids, so a reward model with a
different tokenizer from the policy is the normal case (TRL #1674, OpenRLHF #242).

Spec strings, as given to ``--reward``:
  ``rule:NAME``         a registered rule (``reward.rules``), e.g. ``rule:arithmetic``
  ``pkg.module:func``   user code, imported only from this explicit ``module:function``
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Protocol

from align.errors import ConfigError, DataError
from reward.rules import get_rule


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        """One float per (prompt, response); ``rows`` holds each prompt's other dataset columns."""


class FunctionScorer:
    """Applies ``fn(prompt, response, **columns) -> float`` to each item (rules and user code)."""

    def __init__(self, name: str, fn: Callable[..., float]):
        self.name = name
        self.fn = fn

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return [float(self.fn(p, r, **row)) for p, r, row in zip(prompts, responses, rows)]


def _rule(name: str) -> Scorer:
    return FunctionScorer(f"rule:{name}", get_rule(name))


def _user_function(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return FunctionScorer(spec, fn)


SCORER_KINDS: dict[str, Callable[[str], Scorer]] = {"rule": _rule}


def build_scorer(spec: str) -> Scorer:
    """Build a scorer from its spec string (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(
            f"reward {spec!r} is not a scorer spec; use one of: "
            + ", ".join(f"{k}:NAME" for k in SCORER_KINDS) + ", or module:function for your own code"
        )
    if kind in SCORER_KINDS:
        return SCORER_KINDS[kind](rest)
    return _user_function(spec)


def check_finite(scores: list[float], prompt_ids: list[Any], scorer: str) -> None:
    """NaN or infinite rewards stop the run, naming the prompt, before anything is written."""
    for score, pid in zip(scores, prompt_ids):
        if not math.isfinite(score):
            raise DataError(f"scorer {scorer} returned {score} for prompt {pid}; fix the scorer or drop that prompt")
