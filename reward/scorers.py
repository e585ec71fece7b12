"""Scorers: text in, floats out. One protocol for rules, user functions, reward models and committees.

A scorer sees the decoded prompt and response text, never token ids, so a reward model with a
different tokenizer from the policy is the normal case (huggingface/trl#1674, OpenRLHF/OpenRLHF#242).

Spec strings, as given to ``--reward``:
  ``rule:NAME``         a registered rule (``reward.rules``), e.g. ``rule:arithmetic``
  ``model:PATH``        a reward model folder (``align rm``'s ``model/`` or any HF seq-cls folder)
  ``pkg.module:func``   user code, imported only from this explicit ``module:function``

Several specs make a committee (AFM's iTeC scores with one; docs/methods.md):
``build_scorer(["rule:arithmetic", "model:runs/rm/model"], weights=[0.5, 0.5], combine="weighted",
normalize=True)``. With ``normalize`` each member's scores are z-normalized over the batch
((s - mean) / std; all zeros when std is 0) before combining, so a 0/1 rule and an unbounded
reward model weigh as intended. Combiners (``COMBINERS``): ``weighted`` sum (weights default to
1/n, i.e. the mean), ``mean`` and element-wise ``min`` (a response is as good as its worst grade).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Protocol

from align.core.errors import ConfigError, DataError
from align.core.registry import Registry
from reward.rules import get_rule


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        """One float per (prompt, response); ``rows`` holds each prompt's dataset row: its
        ``prompt`` messages (the whole chat; ``prompts`` has the last user turn) and other columns."""


class FunctionScorer:
    """Applies ``fn(prompt, response, **columns) -> float`` to each item (rules and user code);
    ``columns`` are the row's columns but its ``prompt`` messages (``prompt`` is the text)."""

    def __init__(self, name: str, fn: Callable[..., float]):
        self.name = name
        self.fn = fn

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return [
            float(self.fn(p, r, **{k: v for k, v in row.items() if k != "prompt"}))
            for p, r, row in zip(prompts, responses, rows)
        ]


def _rule(name: str) -> Scorer:
    return FunctionScorer(f"rule:{name}", get_rule(name))


def _model(path: str) -> Scorer:
    from reward.model import RewardModel

    return RewardModel.from_pretrained(path)


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


# The ``KIND:`` prefixes of a spec; any other ``module:function`` is user code.
SCORER_KINDS: Registry[Callable[[str], Scorer]] = Registry("scorer kind")
SCORER_KINDS.register("rule", _rule)
SCORER_KINDS.register("model", _model)


# ---------------------------------------------------------------------------------------------
# Committees
# ---------------------------------------------------------------------------------------------


def z_normalize(scores: list[float]) -> list[float]:
    """(s - mean) / std over the batch (population std); all zeros when every score is equal."""
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [0.0] * len(scores) if std == 0 else [(s - mean) / std for s in scores]


# name -> fn(per-scorer score lists, weights) -> combined scores
COMBINERS: Registry[Callable[[list[list[float]], list[float]], list[float]]] = Registry("reward combine")


@COMBINERS.register("weighted")
def _weighted(columns: list[list[float]], weights: list[float]) -> list[float]:
    return [sum(w * s for w, s in zip(weights, item)) for item in zip(*columns)]


@COMBINERS.register("mean")
def _mean(columns: list[list[float]], weights: list[float]) -> list[float]:
    return [sum(item) / len(item) for item in zip(*columns)]


@COMBINERS.register("min")
def _min(columns: list[list[float]], weights: list[float]) -> list[float]:
    return [min(item) for item in zip(*columns)]


class CommitteeScorer:
    """Combines several scorers' scores item by item (see the module docstring)."""

    def __init__(self, scorers: list[Scorer], weights: list[float], combine: str, normalize: bool):
        self.scorers = scorers
        self.weights = weights
        self.combine = combine
        self.normalize = normalize
        members = ", ".join(f"{s.name}*{w:g}" if combine == "weighted" else s.name for s, w in zip(scorers, weights))
        self.name = f"{combine}{'[z]' if normalize else ''}({members})"

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        ids = [row.get("prompt_id", i) for i, row in enumerate(rows)]
        columns = []
        for scorer in self.scorers:
            scores = scorer.score(prompts, responses, rows)
            check_finite(scores, ids, scorer.name)  # name the member, not the committee
            columns.append(z_normalize(scores) if self.normalize and scores else scores)
        return COMBINERS[self.combine](columns, self.weights)


def _single(spec: str) -> Scorer:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(
            f"reward {spec!r} is not a scorer spec; use one of: "
            + ", ".join(f"{k}:NAME" for k in SCORER_KINDS)
            + ", or module:function for your own code"
        )
    if kind in SCORER_KINDS:
        return SCORER_KINDS[kind](rest)
    return _user_function(spec)


def build_scorer(
    specs: str | list[str],
    weights: list[float] | None = None,
    combine: str = "weighted",
    normalize: bool = False,
) -> Scorer:
    """Build a scorer from one spec string, or a committee from several (module docstring)."""
    COMBINERS[combine]  # an unknown name fails before anything is built
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ConfigError("no reward given; pass at least one scorer spec (e.g. rule:arithmetic)")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(
            f"{len(weights)} reward weights for {len(specs)} scorers ({', '.join(specs)}); give one weight per scorer"
        )
    if weights is not None and combine != "weighted":
        raise ConfigError(
            f"reward weights only apply to combine 'weighted', not {combine!r}; drop the weights or use weighted"
        )
    if len(specs) == 1 and weights is None and not normalize:
        return _single(specs[0])
    weights = list(weights) if weights is not None else [1.0 / len(specs)] * len(specs)
    return CommitteeScorer([_single(s) for s in specs], weights, combine, normalize)


def check_finite(scores: list[float], prompt_ids: list[Any], scorer: str) -> None:
    """NaN or infinite rewards stop the run, naming the prompt, before anything is written."""
    for score, pid in zip(scores, prompt_ids):
        if not math.isfinite(score):
            raise DataError(f"scorer {scorer} returned {score} for prompt {pid}; fix the scorer or drop that prompt")


__all__ = [
    "COMBINERS",
    "CommitteeScorer",
    "FunctionScorer",
    "SCORER_KINDS",
    "Scorer",
    "build_scorer",
    "check_finite",
    "z_normalize",
]
