"""reward.losses: each loss against numbers computed by hand, the registry and preference levels."""

from __future__ import annotations

import math

import pytest
import torch

from align.core.errors import ConfigError, DataError
from reward.losses import (
    IGNORE_GRADE,
    RM_LOSSES,
    SOFT_LABELS,
    RewardBatch,
    bradley_terry,
    get_loss,
    grade_cross_entropy,
    pairwise_metrics,
    parse_level,
    ranking,
    soft_label,
)

# -log sigmoid(x) for the x used below, written out: log(1 + e^-x).
NLS = {x: math.log1p(math.exp(-x)) for x in (-1.0, -0.5, 0.5, 1.0, 2.0, 3.0)}


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_without_and_with_margin():
    # diffs 2-1 = 1 and 0-1 = -1: (0.31326 + 1.31326) / 2
    assert bradley_terry(t(2.0, 0.0), t(1.0, 1.0)).item() == pytest.approx(0.8132616875, abs=1e-9)
    assert bradley_terry(t(2.0, 0.0), t(1.0, 1.0)).item() == pytest.approx((NLS[1.0] + NLS[-1.0]) / 2)
    # Llama 2 margin m = 0.5 on the first pair: diff 1 - 0.5 = 0.5
    loss = bradley_terry(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.5, 0.0)).item()
    assert loss == pytest.approx(0.8936693366, abs=1e-9)
    assert bradley_terry(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))


def test_ranking_every_ordered_pair_and_masked_slots():
    # edited=3 > chosen=1 > rejected=0: pairs 2, 3, 1; a 2-response row 0.5 < 1.0 (wrong order): -0.5.
    # Each row's mean over its pairs, then the mean over the two rows.
    rewards = t(3.0, 1.0, 0.0, 0.5, 1.0, 99.0).reshape(2, 3)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    expected = ((NLS[2.0] + NLS[3.0] + NLS[1.0]) / 3 + NLS[-0.5]) / 2
    assert ranking(rewards, valid).item() == pytest.approx(expected)
    assert ranking(rewards, valid).item() == pytest.approx(0.5685013338, abs=1e-9)
    # on 2-response rows it is the Bradley-Terry loss
    two = t(2.0, 1.0, 0.0, 1.0).reshape(2, 2)
    assert ranking(two, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(
        bradley_terry(t(2.0, 0.0), t(1.0, 1.0)).item()
    )


def test_ranking_weighs_a_row_once_whatever_its_number_of_pairs():
    # A row of 4 responses 3 > 2 > 1 > 0 has 6 pairs (diffs 1, 2, 3, 1, 2, 1); a row of 2 has one
    # pair (0.5 < 1.0: -0.5). Rows weigh 1/2 each, not 6/7 and 1/7.
    rewards = t(3.0, 2.0, 1.0, 0.0, 0.5, 1.0, 99.0, 99.0).reshape(2, 4)
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    four = (3 * NLS[1.0] + 2 * NLS[2.0] + NLS[3.0]) / 6
    assert ranking(rewards, valid).item() == pytest.approx((four + NLS[-0.5]) / 2)
    assert ranking(rewards, valid).item() == pytest.approx(0.5905575284, abs=1e-9)
    assert ranking(rewards[:1], valid[:1]).item() == pytest.approx(four)


def test_soft_label_afm_levels():
    # -p log s(d) - (1-p) log s(-d) = NLS(d) + (1-p) d: d = 1 with p = 0.95 and p = 0.65
    loss = soft_label(t(1.0, 1.0), t(0.0, 0.0), t(0.95, 0.65)).item()
    assert loss == pytest.approx(((NLS[1.0] + 0.05) + (NLS[1.0] + 0.35)) / 2)
    assert loss == pytest.approx(0.5132616875, abs=1e-9)
    # p = 1 is Bradley-Terry; at d = 0 every p gives log 2
    assert soft_label(t(2.0), t(1.0), t(1.0)).item() == pytest.approx(NLS[1.0])
    assert soft_label(t(0.0), t(0.0), t(0.65)).item() == pytest.approx(math.log(2))
    assert SOFT_LABELS == {"significantly": 0.95, "better": 0.85, "slightly": 0.75, "negligibly": 0.65}


def test_grade_cross_entropy_ignores_missing_grades():
    ln2 = math.log(2)
    logits = t(0, 0, ln2, 0, 0, ln2, 5, 5, 5).reshape(3, 1, 3)  # softmax (1/4, 1/4, 1/2)
    labels = torch.tensor([[2], [0], [IGNORE_GRADE]])
    # (-log 1/2 - log 1/4) / 2
    assert grade_cross_entropy(logits, labels).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert grade_cross_entropy(logits, torch.full((3, 1), IGNORE_GRADE)).item() == 0.0


def test_grade_cross_entropy_sums_the_heads():
    # Head 0 graded on both responses: -log 1/2 and -log 1/4 (mean 1.5 log 2); head 1 on the first
    # only, uniform over 3 classes: log 3. AFM sums the heads: 1.5 log 2 + log 3.
    ln2 = math.log(2)
    logits = t(0, 0, ln2, 0, 0, 0, 0, 0, ln2, 7, 1, 2).reshape(2, 2, 3)
    labels = torch.tensor([[2, 1], [0, IGNORE_GRADE]])
    assert grade_cross_entropy(logits, labels).item() == pytest.approx(1.5 * math.log(2) + math.log(3))
    assert grade_cross_entropy(logits, labels).item() == pytest.approx(2.1383330595, abs=1e-9)


def test_registry_losses_read_the_batch():
    batch = RewardBatch(
        t(2.0, 1.0, 0.0, 1.0).reshape(2, 2), torch.ones(2, 2, dtype=torch.bool), t(0.5, 0.0), t(0.95, 0.65)
    )
    assert RM_LOSSES["bradley_terry"].fn(batch).item() == pytest.approx((NLS[0.5] + NLS[-1.0]) / 2)
    assert RM_LOSSES["ranking"].fn(batch).item() == pytest.approx((NLS[1.0] + NLS[-1.0]) / 2)
    assert RM_LOSSES["soft_label"].fn(batch).item() == pytest.approx(((NLS[1.0] + 0.05) + (NLS[-1.0] - 0.35)) / 2)
    assert RM_LOSSES["soft_label"].needs_level and RM_LOSSES["ranking"].uses_edited


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_loss("rankng")
    assert str(err.value) == f"unknown reward loss 'rankng' (did you mean 'ranking'?); valid: {', '.join(RM_LOSSES)}"


def test_preference_levels():
    assert [
        parse_level(v, "x")
        for v in ("Significantly better", "better", "slightly better", "unsure", "negligibly better/unsure")
    ] == ["significantly", "better", "slightly", "negligibly", "negligibly"]
    with pytest.raises(
        DataError,
        match=r"f\.jsonl row 3: unknown preference level 'much'; use one of: significantly, better, slightly, negligibly",
    ):
        parse_level("much", "f.jsonl row 3")


def test_pairwise_metrics():
    m = pairwise_metrics([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, -1.0, 4.0])
    assert m == {"accuracy": 0.75, "mean_margin": pytest.approx(0.5)}
