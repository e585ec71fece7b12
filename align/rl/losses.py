"""Policy-gradient losses: small pure functions on per-token log-probs, with hand-checked tests.

Conventions: ``logp``, ``logp_old``, ``logp_ref`` are ``[B, T]`` per-token log-probs of the
sampled response tokens; ``mask`` is 1 on response tokens. Sequence quantities are sums over
the mask. Every function returns ``(loss, stats)`` where ``stats`` holds detached floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def seq_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on samples from pi: exp(d) - d - 1 with d = ref - logp.

    Schulman's "k3" estimator (unbiased, always >= 0), as GRPO uses it (DeepSeekMath eq. 4).
    """
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def truncated_is_weights(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 3.0,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Truncated importance-sampling weights (TIS; Yao et al. 2025) for rollouts sampled by an engine
    whose log-probs differ from the trainer's (a bf16 vLLM, an fp32 policy): ``min(exp(trainer_logp -
    engine_logp), cap)`` per token (``[B, T]``; 1 off the mask), or with ``per_sequence`` one weight
    per row from the summed difference (``[B]``). TRL's ``vllm_importance_sampling_correction`` in its
    ``token_truncate`` / ``sequence_truncate`` modes (trl/trainer/grpo_trainer.py), ``cap`` its
    ``vllm_importance_sampling_clip_max``, no lower bound. Detached: a constant weight of the loss.
    """
    diff = ((trainer_logp - engine_logp) * mask).detach()
    if per_sequence:
        diff = diff.sum(-1)
    return torch.exp(diff).clamp(max=cap)


def clipped_surrogate(logp, logp_old, advantages, mask, clip_eps: float = 0.2, weights=None):
    """PPO's clipped objective (Schulman et al. 2017, eq. 7), averaged over response tokens.

    ``advantages`` is ``[B, T]`` (broadcast a sequence advantage with ``[:, None]`` first);
    ``weights`` (``[B, T]``, optional) multiply each token's term (``truncated_is_weights``), the
    mean still over the response tokens, as TRL's ``per_token_loss * importance_sampling_ratio``.
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    terms = torch.minimum(unclipped, clipped)
    if weights is not None:
        terms = terms * weights
    loss = -masked_mean(terms, mask)
    clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
    return loss, {"clip_frac": clip_frac.item(), "ratio_mean": masked_mean(ratio, mask).item()}


def sequence_clipped_surrogate(logp, logp_old, advantages, mask, clip_eps: float = 0.2, weights=None):
    """PPO's clipped objective with the whole response as one action, averaged over sequences.

    RLOO (Ahmadian et al. 2024) models a response as a single action, so the importance ratio is
    the sequence's pi_theta(y|x) / pi_old(y|x) = exp(sum_t (logp_t - logp_old_t)) over the
    response tokens; the loss is -mean_i min(ratio_i A_i, clip(ratio_i, 1 - eps, 1 + eps) A_i)
    with one advantage per sequence (``advantages`` is ``[B]``). The paper's RLOO is on-policy
    and unclipped (ratio 1 at its single step); the clip and the mean over sequences are TRL
    1.16's ``RLOOTrainer``'s, which this follows (one ``eps`` for both sides: no ``epsilon_high``).
    A row whose mask is empty has ratio 1 and no gradient, and still counts in the mean.
    """
    ratio = torch.exp(seq_sum(logp - logp_old, mask))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    terms = torch.minimum(unclipped, clipped)
    if weights is not None:  # [B]: truncated_is_weights per sequence
        terms = terms * weights
    loss = -terms.mean()
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mean()
    return loss, {"clip_frac": clip_frac.item(), "ratio_mean": ratio.mean().item()}


def clipped_value_loss(values, values_old, returns, mask, clip_eps: float = 0.2):
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped = values_old + torch.clamp(values - values_old, -clip_eps, clip_eps)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    return loss, {"value_loss": loss.item()}


def mirror_descent(logp, logp_old, advantages, mask, t: float = 1.0, max_log_ratio: float = 20.0):
    """AFM's MDLOO update objective: -mean_i[ratio_i * A_i] + (1/t) * KL(pi_theta || pi_k).

    Mirror Descent Policy Optimization (Tomar et al. 2020) replaces PPO's clipping by a KL term
    toward the previous iterate pi_k. The whole response is one action, so ``ratio_i`` is the
    sequence ratio pi_theta(y_i|x) / pi_k(y_i|x). Departures: the sequence log-ratio is clamped to
    +-``max_log_ratio`` before exponentiating, so one long response cannot overflow; the KL is
    estimated per token from pi_k's samples as r log r - (r - 1) with r = pi_theta / pi_k (the
    f-divergence form of KL(pi_theta || pi_k); the -(r - 1) term has zero mean and makes each
    sample's estimate >= 0 with zero gradient at pi_theta = pi_k), summed over the response.
    """
    log_ratio = seq_sum(logp - logp_old, mask).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    token_log_ratio = logp - logp_old
    token_ratio = torch.exp(token_log_ratio)
    kl = seq_sum(token_ratio * token_log_ratio - (token_ratio - 1), mask)
    loss = -(ratio * advantages).mean() + kl.mean() / t
    return loss, {"kl_old": kl.mean().item(), "ratio_mean": ratio.mean().item()}


def chosen_nll(logp, mask):
    """Llama 3's NLL regularizer of DPO: the mean negative log-likelihood per chosen-response token.

    ``logp`` and ``mask`` hold the chosen responses' rows only. The tokens of all rows are pooled
    (sum over every masked token / their count), as TRL 1.16's DPO ``sft`` loss type computes the
    ``nll`` term of ``align dpo``, so both stages weigh the term alike. Departure: Llama 3 cites
    Pang et al. 2024, who normalize each pair's NLL by its own length and then average over pairs;
    pooled, a long chosen response weighs more than a short one.
    """
    return -masked_mean(logp, mask)


def dpo_sigmoid(chosen_logp, rejected_logp, chosen_ref, rejected_ref, beta: float = 0.1):
    """DPO (Rafailov et al. 2023, eq. 7) on sequence log-probs: -log sigmoid(beta * margin)."""
    margin = (chosen_logp - chosen_ref) - (rejected_logp - rejected_ref)
    loss = -F.logsigmoid(beta * margin).mean()
    return loss, {"dpo_margin": (beta * margin).mean().item(), "dpo_accuracy": (margin > 0).float().mean().item()}
