"""Advantage estimators: pure functions on tensors, each tested against hand-computed numbers.

Shapes: ``rewards`` is ``[n_prompts, K]`` (K samples of each prompt) for the group estimators;
per-token tensors are ``[B, T]`` with a 0/1 ``mask`` over response tokens.
"""

from __future__ import annotations

import torch


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = R_i - mean_{j != i} R_j over the K samples of a prompt (RLOO; AFM's MDLOO).

    Ahmadian et al. 2024 ("Back to Basics"), eq. 6; the same baseline AFM uses in MDLOO.
    Needs K >= 2.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def group_normalized(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) over the K samples of a prompt (GRPO).

    Shao et al. 2024 (DeepSeekMath), section 4.1.2. We use the population std (``unbiased=False``)
    so that a group of two gives +-1, and ``eps`` keeps all-equal groups at 0.
    """
    if rewards.shape[-1] < 2:
        raise ValueError("group normalization needs at least 2 samples per prompt")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def mdloo_rewards(scores: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """AFM's KL-regularized sequence reward R(x, y) = r(x, y) - beta * log(pi_k(y|x) / pi_ref(y|x)).

    ``logp_old`` and ``logp_ref`` are sequence log-probabilities (summed over response tokens).
    """
    return scores - beta * (logp_old - logp_ref)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean, unit-variance over the masked entries (PPO's advantage normalization)."""
    n = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / n
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation over response tokens (Schulman et al. 2016, eq. 16).

    ``rewards``, ``values`` and ``mask`` are ``[B, T]``; positions outside the mask are ignored and
    the value after the last response token is 0 (the episode ends there). Returns
    ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Outside the response, carry nothing over: reset the recursion and keep the next value.
        running = running * m
        advantages[:, t] = running
        next_value = torch.where(m.bool(), values[:, t], next_value)
    return advantages, (advantages + values) * mask
