"""Selection strategies: K scored candidates of one prompt -> training rows in TRL's formats.

Registered by name (``--select``):

* ``best``: best-of-K -> one SFT row ``prompt``/``completion`` (conversational). Rejection
  sampling as in Llama 2/3 (Touvron et al. 2023, sec. 3.2.3; Dubey et al. 2024, sec. 4.2.2):
  sample K, keep the highest-reward response. Ties go to the lowest candidate index;
  ``min_reward`` drops prompts whose best is below it (e.g. no correct answer).
* ``pairs``: best vs worst -> one preference row ``prompt``/``chosen``/``rejected`` (as in
  RLHFlow's and Llama 3's on-policy pair building). Kept only when the reward margin is
  positive and at least ``min_margin``: ties carry no preference and are skipped. Among equal
  rewards the lowest candidate index is taken, for chosen and rejected alike. Over a committee
  (candidates of several models, AFM's iTeC preference collection, Gunter et al. 2024, sec. 5.2)
  the rejected side is the worst candidate of *another* member than the chosen one's, when some
  other member's candidate scores below the chosen: pairs then compare models, as iTeC's
  annotators did; the scorer stands in for the annotators.
* ``all``: every candidate with its reward -> ``prompt``/``completion`` rows plus ``reward``.

Each candidate carries the ``model`` it was sampled from; rows record it (``model``, or
``chosen_model`` / ``rejected_model``).

Identical candidates (same text) are de-duplicated before selection (``dedupe``), so a pair is
never a response against itself and ``all`` holds each distinct response once. Every row keeps
the prompt's ``prompt_id`` and its other columns (e.g. ``answer``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from align.registry import Registry


@dataclasses.dataclass(frozen=True)
class Scored:
    """One distinct candidate of a prompt: its index among the K samples, text and reward."""

    index: int
    text: str
    reward: float
    model: str = ""


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    min_margin: float = 0.0
    min_reward: float | None = None


Strategy = Callable[[dict[str, Any], list[Scored], SelectOptions], list[dict[str, Any]]]
STRATEGIES: Registry[Strategy] = Registry("selection strategy")
get_strategy = STRATEGIES.get  # an unknown name is a ConfigError listing the valid ones


def dedupe(texts: list[str]) -> list[int | None]:
    """For each candidate, the index of an earlier identical one (None for a first occurrence)."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, text in enumerate(texts):
        out.append(first.get(text))
        first.setdefault(text, i)
    return out


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _base(row: dict[str, Any]) -> dict[str, Any]:
    """The prompt, its id and its other columns, prompt first (TRL reads columns by name)."""
    return {"prompt": row["prompt"], **{k: v for k, v in row.items() if k != "prompt"}}


def _best(cands: list[Scored]) -> Scored:
    return max(cands, key=lambda c: (c.reward, -c.index))


def _worst(cands: list[Scored]) -> Scored:
    return min(cands, key=lambda c: (c.reward, c.index))


@STRATEGIES.register("best")
def best_of_k(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    top = _best(cands)
    if opts.min_reward is not None and top.reward < opts.min_reward:
        return []
    return [{**_base(row), "completion": _assistant(top.text), "candidate_index": top.index, "reward": top.reward,
             "model": top.model}]


@STRATEGIES.register("pairs")
def best_vs_worst(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    chosen = _best(cands)
    others = [c for c in cands if c.model != chosen.model and c.reward < chosen.reward]
    rejected = _worst(others or cands)
    margin = chosen.reward - rejected.reward
    if margin <= 0 or margin < opts.min_margin:
        return []
    return [{
        **_base(row), "chosen": _assistant(chosen.text), "rejected": _assistant(rejected.text),
        "chosen_index": chosen.index, "rejected_index": rejected.index,
        "chosen_reward": chosen.reward, "rejected_reward": rejected.reward,
        "chosen_model": chosen.model, "rejected_model": rejected.model,
    }]


@STRATEGIES.register("all")
def every_candidate(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    return [
        {**_base(row), "completion": _assistant(c.text), "candidate_index": c.index, "reward": c.reward, "model": c.model}
        for c in sorted(cands, key=lambda c: c.index)
    ]
