"""Reward-model losses: small pure functions on reward tensors, looked up by name in ``RM_LOSSES``.

    align rm --loss bradley_terry | ranking | soft_label   (see align/stages/rm.py)

Every loss reads a ``RewardBatch``: the scalar rewards of each row's responses laid out best
first (``rewards[b, 0]`` is the preferred one), a mask of which slots hold a response (rows may
have 2 or 3), and the per-row margin and soft label. The formulas (docs/methods.md):

* ``bradley_terry``: -log sigmoid(r_c - r_r - m). Llama 2 (Touvron et al. 2023, eq. 2) uses a
  margin m by preference level; Llama 3 (Dubey et al. 2024, sec. 4.1.2) removes it (m = 0,
  our default).
* ``ranking``: Llama 3's rows with an edited response rank edited > chosen > rejected; the report
  gives no formula, so we average the Bradley-Terry term over every ordered pair of the row
  (3 pairs; 1 for an ordinary row, where it equals ``bradley_terry``), then over rows: each row
  weighs once, however many responses it has. Llama 3 packs the responses of one prompt in one
  sequence; we score them as separate sequences.
* ``soft_label``: AFM (Apple 2024, sec. 5.1): -p log sigmoid(r_c - r_r) - (1 - p) log
  sigmoid(r_r - r_c), with p from the preference level (``SOFT_LABELS``).
* ``grade_cross_entropy``: AFM's single-sided grades, extra classification heads on the same
  last-token embedding trained with cross-entropy, summed over the heads as AFM sums its grading
  losses; added to any loss with weight lambda.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from align.core.errors import DataError
from align.core.registry import Registry

# AFM's soft labels for "significantly / better / slightly / negligibly better" (docs/methods.md).
SOFT_LABELS: dict[str, float] = {"significantly": 0.95, "better": 0.85, "slightly": 0.75, "negligibly": 0.65}
# Llama 2's "margin small" (Touvron et al. 2023, table 28), by the same levels.
LLAMA2_MARGINS: dict[str, float] = {"significantly": 1.0, "better": 2 / 3, "slightly": 1 / 3, "negligibly": 0.0}
IGNORE_GRADE = -100


def parse_level(value: object, where: str) -> str:
    """A preference level as one of ``SOFT_LABELS``' keys; accepts "significantly better",
    "Better", "negligibly better/unsure" and "unsure". Anything else is a DataError."""
    text = str(value).strip().lower().removesuffix("/unsure").removesuffix(" better").strip()
    text = "negligibly" if text == "unsure" else text
    if text not in SOFT_LABELS:
        raise DataError(
            f"{where}: unknown preference level {value!r}; use one of: {', '.join(SOFT_LABELS)}"
            " (optionally followed by 'better')"
        )
    return text


@dataclasses.dataclass
class RewardBatch:
    """Rewards of B rows with up to K responses each, best first."""

    rewards: torch.Tensor  # [B, K]
    valid: torch.Tensor  # [B, K] bool: slot k holds a response
    margin: torch.Tensor  # [B] Bradley-Terry margin m (zeros for Llama 3)
    soft_label: torch.Tensor  # [B] AFM p (probability that slot 0 beats slot 1)


def ordered_pairs(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_i - r_j, mask) for every slot pair i < j of each row: [B, P] each, P = K(K-1)/2."""
    k = rewards.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    return rewards[:, i] - rewards[:, j], valid[:, i] & valid[:, j]


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r - m) (Llama 2 eq. 2; Llama 3 uses m = 0)."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    return -F.logsigmoid(diff).mean()


def ranking(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the row's mean over its ordered pairs (i better than j) of -log sigmoid(r_i - r_j).

    ``rewards`` [B, K] best first (edited > chosen > rejected), ``valid`` masks empty slots. Each
    row weighs once: a row of 3 responses (3 pairs) counts as much as one of 2 (1 pair), as in
    Llama 3, where a row is one prompt's preference annotation. Rows without a pair are left out.
    """
    diff, mask = ordered_pairs(rewards, valid)
    mask = mask.to(diff.dtype)
    pairs = mask.sum(-1)
    per_row = -(F.logsigmoid(diff) * mask).sum(-1) / pairs.clamp(min=1)
    rows = (pairs > 0).to(diff.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def soft_label(chosen: torch.Tensor, rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean of -p log sigmoid(r_c - r_r) - (1 - p) log sigmoid(r_r - r_c) (AFM soft-label ranking)."""
    diff = chosen - rejected
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff)).mean()


def grade_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over grade heads of each head's mean cross-entropy over the responses graded for it.

    ``logits`` [N, H, C], ``labels`` [N, H] with ``IGNORE_GRADE`` where a response has no grade
    for that head; a head with no grade in the batch adds 0 (0 when nothing is graded). AFM
    (Apple 2024, sec. 5.1) adds the single-sided grading losses to the preference loss as a sum,
    so each head weighs fully whatever the number of heads. Departure: AFM does not say how a
    head's loss averages over responses; we take the mean over the graded ones.
    """
    n, heads, classes = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), ignore_index=IGNORE_GRADE, reduction="none")
    graded = (labels != IGNORE_GRADE).to(ce.dtype)
    return (ce.view(n, heads).sum(0) / graded.sum(0).clamp(min=1)).sum()


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[RewardBatch], torch.Tensor]
    needs_level: bool  # every row must carry a preference_level
    uses_edited: bool  # rows may carry a third, edited response


RM_LOSSES: Registry[Loss] = Registry("reward loss")
get_loss = RM_LOSSES.get  # an unknown name is a ConfigError listing the valid ones


def register_loss(name: str, needs_level: bool = False, uses_edited: bool = False):
    """Add ``fn(batch: RewardBatch) -> scalar`` to ``RM_LOSSES``; a taken name is a ValueError."""

    def decorator(fn: Callable[[RewardBatch], torch.Tensor]):
        RM_LOSSES.register(name, Loss(name, fn, needs_level, uses_edited))
        return fn

    return decorator


@register_loss("bradley_terry")
def _bradley_terry(batch: RewardBatch) -> torch.Tensor:
    return bradley_terry(batch.rewards[:, 0], batch.rewards[:, 1], batch.margin)


@register_loss("ranking", uses_edited=True)
def _ranking(batch: RewardBatch) -> torch.Tensor:
    return ranking(batch.rewards, batch.valid)


@register_loss("soft_label", needs_level=True)
def _soft_label(batch: RewardBatch) -> torch.Tensor:
    return soft_label(batch.rewards[:, 0], batch.rewards[:, 1], batch.soft_label)


def pairwise_metrics(better: list[float], worse: list[float]) -> dict[str, float]:
    """Pairwise accuracy (share of pairs with r_better > r_worse) and mean margin r_better - r_worse."""
    if not better:
        return {"accuracy": float("nan"), "mean_margin": float("nan")}
    diffs = [b - w for b, w in zip(better, worse)]
    return {"accuracy": sum(d > 0 for d in diffs) / len(diffs), "mean_margin": sum(diffs) / len(diffs)}


__all__ = [
    "LLAMA2_MARGINS",
    "RM_LOSSES",
    "Loss",
    "RewardBatch",
    "SOFT_LABELS",
    "bradley_terry",
    "get_loss",
    "grade_cross_entropy",
    "ordered_pairs",
    "pairwise_metrics",
    "parse_level",
    "ranking",
    "register_loss",
    "soft_label",
]
