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
* ``bradley_terry``: the first two distinct candidates as one preference row labelled the way a
  noisy annotator would: ``a`` is chosen over ``b`` with probability sigmoid((r_a - r_b) / tau)
  (the Bradley-Terry model, Bradley & Terry 1952; the synthetic-gold protocol of Gao et al. 2022,
  "Scaling Laws for Reward Model Overoptimization", with the scorer as the gold). ``tau`` = 0 is a
  noise-free annotator; ties are dropped (no preference). The draw is seeded by the seed and the
  prompt id, so reruns, resumes and shards label alike. Rows keep both scores
  (``chosen_reward``/``rejected_reward``): a reward model's held-out accuracy against the
  noise-free ordering is read from them (``align rm``'s ``eval_accuracy_noise_free``).

Each candidate carries the ``model`` it was sampled from; rows record it (``model``, or
``chosen_model`` / ``rejected_model``).

Identical candidates (same text) are de-duplicated before selection (``dedupe``), so a pair is
never a response against itself and ``all`` holds each distinct response once. Every row keeps
the prompt's ``prompt_id`` and its other columns (e.g. ``answer``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable

from align.core.registry import Registry


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
    tau: float = 0.0  # bradley_terry: the annotator's noise temperature
    seed: int = 0  # bradley_terry: seeds each prompt's label draw with the prompt id


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
    return [
        {
            **_base(row),
            "completion": _assistant(top.text),
            "candidate_index": top.index,
            "reward": top.reward,
            "model": top.model,
        }
    ]


@STRATEGIES.register("pairs")
def best_vs_worst(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    chosen = _best(cands)
    others = [c for c in cands if c.model != chosen.model and c.reward < chosen.reward]
    rejected = _worst(others or cands)
    margin = chosen.reward - rejected.reward
    if margin <= 0 or margin < opts.min_margin:
        return []
    return [
        {
            **_base(row),
            "chosen": _assistant(chosen.text),
            "rejected": _assistant(rejected.text),
            "chosen_index": chosen.index,
            "rejected_index": rejected.index,
            "chosen_reward": chosen.reward,
            "rejected_reward": rejected.reward,
            "chosen_model": chosen.model,
            "rejected_model": rejected.model,
        }
    ]


@STRATEGIES.register("all")
def every_candidate(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    return [
        {
            **_base(row),
            "completion": _assistant(c.text),
            "candidate_index": c.index,
            "reward": c.reward,
            "model": c.model,
        }
        for c in sorted(cands, key=lambda c: c.index)
    ]


def prefer_first(a: float, b: float, tau: float) -> float:
    """P(a is preferred to b) under Bradley-Terry with temperature ``tau``: sigmoid((a - b) / tau);
    ``tau`` = 0 is the noise-free limit (1, 0.5 on a tie, 0)."""
    if tau == 0:
        return 1.0 if a > b else 0.5 if a == b else 0.0
    z = (a - b) / tau
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@STRATEGIES.register("bradley_terry")
def annotated_pair(row: dict[str, Any], cands: list[Scored], opts: SelectOptions) -> list[dict[str, Any]]:
    first = sorted(cands, key=lambda c: c.index)[:2]
    if len(first) < 2 or first[0].reward == first[1].reward:
        return []
    a, b = first
    draw = random.Random(f"{opts.seed}:{row['prompt_id']}").random()
    chosen, rejected = (a, b) if draw < prefer_first(a.reward, b.reward, opts.tau) else (b, a)
    return [
        {
            **_base(row),
            "chosen": _assistant(chosen.text),
            "rejected": _assistant(rejected.text),
            "chosen_index": chosen.index,
            "rejected_index": rejected.index,
            "chosen_reward": chosen.reward,
            "rejected_reward": rejected.reward,
            "chosen_model": chosen.model,
            "rejected_model": rejected.model,
        }
    ]
