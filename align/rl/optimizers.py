"""Policy optimizers for the experience loop, in a registry with one interface.

Each optimizer turns a batch of scored rollouts (K samples per prompt) into a few gradient
steps on the policy. They share ``PolicyOptimizer.update`` (prepare old/ref log-probs, run
``inner_steps`` steps, clip gradients) and differ only in ``advantages`` and ``loss``, which
call the pure functions in ``align.rl.estimators`` and ``align.rl.losses``.

Why our own and not TRL's: TRL 1.16 has no PPO at all, no MDLOO, and its GRPO/RLOO trainers own
the generation loop (their colocated vLLM weight sync failed on CPU in fp32 for a full fine-tune;
with LoRA it ran, 2.4-2.7x slower than this loop: bench/bench_rlhf.py); here the loop is shared
and the optimizer is the pluggable part.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from align.core.registry import Registry
from align.rl import estimators as est
from align.rl import losses as L
from align.rl import parallel
from align.rl.merging_optimizer import OnlineMergingAdamW
from align.rl.rollout import (
    Rollouts,
    backward_by_groups,
    forward_logprobs,
    length_groups,
    token_logprobs,
    truncation_view,
)

OPTIMIZERS: Registry[type["PolicyOptimizer"]] = Registry("optimizer")
get_optimizer = OPTIMIZERS.get  # an unknown name is a ConfigError listing the valid ones


def linear_warmup(warmup_steps: int, step: int) -> float:
    """The learning rate's factor at optimizer step ``step`` (0-based): (step + 1) / warmup_steps
    until it reaches 1 (transformers' linear warmup, without its wasted first step at 0)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def register_optimizer(cls: type["PolicyOptimizer"]) -> type["PolicyOptimizer"]:
    """Class decorator: register ``cls`` under its ``name``; a name already taken is a ValueError."""
    return OPTIMIZERS.register(cls.name, cls)


def disable_dropout(model: nn.Module) -> None:
    """Turn off every dropout of ``model`` in place, as TRL's ``disable_dropout_in_model`` does.

    The policy trains in train mode, so with dropout on, pi_old's log-probs (one forward) and the
    first inner step's (another forward) see different dropout masks and the PPO/GRPO ratio is
    noise instead of exactly 1. Sets ``p = 0`` on every ``nn.Dropout`` (LoRA's ``lora_dropout``
    is one; so is align's ``CpuFastDropout`` where the trainer stages put it) and, beyond TRL, zeroes the ``attention_dropout`` rate that Hugging Face attention
    modules apply functionally in train mode.
    """
    from align.training.lora_dropout import CpuFastDropout

    for module in model.modules():
        if isinstance(module, (nn.Dropout, CpuFastDropout)):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), (int, float)):
            module.attention_dropout = 0.0


class PolicyOptimizer:
    """Base: subclasses set ``name``/``min_samples`` and implement ``loss`` (and maybe ``prepare``).

    The policy's dropout is turned off here (``disable_dropout``): the loop trains it in train
    mode, and the ratio to pi_old must be exactly 1 before the first step. Every log-prob (the
    policy's, pi_old's and the reference's) is taken at the rollouts' sampling ``temperature``
    (``token_logprobs``): the ratios and KL terms then compare the policies that actually sample.
    """

    name: ClassVar[str]
    min_samples: ClassVar[int] = 1  # K needed per prompt (2 for leave-one-out and group baselines)
    masks_truncated: ClassVar[bool] = True  # whether mask_truncated_completions applies (a loss over response tokens)
    importance_sampling: ClassVar[bool] = (
        False  # whether its loss takes importance-sampling weights (RLHFConfig.importance_sampling)
    )
    per_sequence_is: ClassVar[bool] = False  # one weight per sequence (a sequence-level ratio) instead of per token

    def __init__(self, cfg: Any, policy: nn.Module, ref_logprobs: Callable | None):
        disable_dropout(policy)
        self.cfg = cfg
        self.policy = policy
        self.ref_logprobs = ref_logprobs
        self.extra = self.extra_modules()
        params = [p for p in policy.parameters() if p.requires_grad]
        params += [p for m in self.extra.values() for p in m.parameters()]
        self.params = params
        if cfg.optimizer_merge == "none":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        else:  # Qwen2's Online Merging Optimizer (align.rl.merging_optimizer)
            self.optimizer = OnlineMergingAdamW(
                params, lr=cfg.learning_rate, **cfg.merging_kwargs(policy, seed=cfg.seed)
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(linear_warmup, cfg.warmup_steps))

    # -- hooks -------------------------------------------------------------------------------
    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules beside the policy (PPO's value head), saved in checkpoints."""
        return {}

    @classmethod
    def uses_reference(cls, cfg: Any) -> bool:
        """Whether this optimizer needs reference log-probs under ``cfg`` (decides if one is built)."""
        return cfg.kl_coef > 0

    @property
    def needs_ref(self) -> bool:
        return self.uses_reference(self.cfg)

    def row_local(self) -> bool:
        """Whether the loss is a sum of per-row terms, each depending on its own row's log-probs
        and on batch constants fixed before the policy's forward (advantages from the scores,
        the reference's log-probs, the token count). Then a one-step update can backpropagate
        each length group right after its forward (``update``)."""
        return False

    def loss(self, r: Rollouts, logp, entropy, hidden) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(
        self, r: Rollouts, logp: torch.Tensor, entropy: torch.Tensor, hidden: torch.Tensor | None
    ) -> dict[str, float]:
        """Fix this batch's log-probs (and values) under the sampling policy, and the reference's."""
        r.logp_old = logp.detach()
        r.is_weights = self.importance_weights(r)
        if self.extra:
            r.values_old = self.values(hidden.detach())
        stats = {"entropy": L.masked_mean(entropy, r.response_mask).item()}
        if self.needs_ref:
            if r.logp_ref is None:
                r.logp_ref = self.ref_logprobs(r.input_ids, r.attention_mask)
            stats["kl_ref"] = L.seq_sum(r.logp_old - r.logp_ref, r.response_mask).mean().item()
        return stats

    def update(self, r: Rollouts) -> dict[str, float]:
        """``inner_steps`` optimizer steps on one batch of rollouts; returns their mean stats.

        A batch of more than ``forward_batch_size`` rows is not backpropagated at once (that keeps
        every row's activations alive). A one-step update with a ``row_local`` loss (GRPO; RLOO
        without the KL shaping) backpropagates each length group right after its forward
        (``_row_local_step``). Otherwise the loss is computed on log-probs from a pass without
        gradients, and its gradient with respect to them is then pushed through the model one
        length group at a time (``backward_by_groups``). The same gradients either way; the second
        costs one more forward pass.

        Responses cut at ``max_tokens`` first lose ``missing_eos_penalty`` from their reward and,
        with ``mask_truncated_completions``, their rows of ``mask`` (``truncation_view``): the loss
        terms use ``mask``, while rewards, advantages and statistics use every response token
        (``Rollouts.response_mask``), so a masked response still counts in its group's baseline.
        """
        self.policy.train()
        r = truncation_view(r, self.cfg.mask_truncated_completions, self.cfg.missing_eos_penalty)
        by_groups = r.input_ids.shape[0] > self.cfg.forward_batch_size
        if by_groups and self.cfg.inner_steps == 1 and self.row_local():
            return self._row_local_step(r)

        def forward(grad: bool):
            with torch.set_grad_enabled(grad):
                return token_logprobs(
                    self.policy,
                    r.input_ids,
                    r.attention_mask,
                    with_hidden=bool(self.extra),
                    batch_size=self.cfg.forward_batch_size,
                    temperature=self.cfg.temperature,
                )

        # One step from pi_old: its own forward gives pi_old's log-probs (detached), so a separate
        # no-grad pass would only repeat it (TRL's GRPO/RLOO do the same).
        one_step = self.cfg.inner_steps == 1
        first = forward(grad=one_step and not by_groups)
        stats = self.prepare(r, *first)
        totals: dict[str, float] = {}
        for step in range(self.cfg.inner_steps):
            if by_groups:  # leaves: the loss's gradient stops at the log-probs (and hidden states)
                logp, entropy, hidden = first if step == 0 else forward(grad=False)
                logp = logp.detach().requires_grad_()
                hidden = hidden.detach().requires_grad_() if hidden is not None else None
            else:
                logp, entropy, hidden = first if one_step else forward(grad=True)
            loss, step_stats = self.loss(r, logp, entropy, hidden)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # every loss keeps a graph, even one with nothing to learn (zero)
            if by_groups:
                backward_by_groups(
                    self.policy,
                    r.input_ids,
                    r.attention_mask,
                    logp.grad,
                    hidden.grad if hidden is not None else None,
                    self.cfg.forward_batch_size,
                    temperature=self.cfg.temperature,
                )
            step_stats["grad_norm"] = self._apply_gradients()
            step_stats["loss"] = loss.item()
            for key, value in step_stats.items():
                totals[key] = totals.get(key, 0.0) + value / self.cfg.inner_steps
        return {**stats, **totals}

    def _row_local_step(self, r: Rollouts) -> dict[str, float]:
        """One step, a length group at a time: forward with gradients, loss, backward, and the
        group's activations are freed before the next group's forward.

        Each group's loss is the whole batch's loss with every other row's log-probs held constant
        (rows not yet seen: placeholders equal to their pi_old, ratio 1), so its gradient is that
        group's share of the batch gradient (``row_local``); the groups' gradients add up to the
        batch's. The loss and stats are computed once more at the end on the finished pi_old.
        """
        if self.needs_ref:
            r.logp_ref = self.ref_logprobs(r.input_ids, r.attention_mask)
        rows, width = r.input_ids.shape
        logp_old = torch.zeros(rows, width - 1, device=r.input_ids.device)
        entropy = torch.zeros_like(logp_old)
        r.logp_old = logp_old  # filled group by group below
        self.optimizer.zero_grad(set_to_none=True)
        for idx, w in length_groups(r.attention_mask, self.cfg.forward_batch_size):
            logp_g, entropy_g, _ = forward_logprobs(
                self.policy, r.input_ids[idx, :w], r.attention_mask[idx, :w], False, temperature=self.cfg.temperature
            )
            logp_old[idx, : w - 1] = logp_g.detach()
            r.is_weights = self.importance_weights(r)  # this group's rows final; the others' have no gradient yet
            entropy[idx, : w - 1] = entropy_g
            logp = logp_old.index_put((idx,), F.pad(logp_g, (0, width - w)))  # this group's rows carry gradients
            loss, _ = self.loss(r, logp, entropy, None)
            loss.backward()
        stats = self.prepare(r, logp_old, entropy, None)
        with torch.no_grad():
            loss, step_stats = self.loss(r, logp_old, entropy, None)
        return {**stats, **step_stats, "grad_norm": self._apply_gradients(), "loss": loss.item()}

    def importance_weights(self, r: Rollouts) -> torch.Tensor | None:
        """Truncated importance-sampling weights of pi_old (the trainer's) against the engine's
        log-probs (``losses.truncated_is_weights``), or None for rollouts without the engine's."""
        if r.logp_engine is None:
            return None
        cap = self.cfg.importance_sampling_cap or 3.0
        return L.truncated_is_weights(
            r.logp_old, r.logp_engine, r.response_mask, cap, per_sequence=self.per_sequence_is
        )

    def _apply_gradients(self) -> float:
        """Average the accumulated gradients over processes (data parallel: the same step on every
        rank), clip them, step the optimizer; returns the gradient norm before clipping."""
        parallel.average_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.extra["value_head"](hidden.float()).squeeze(-1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **{k: m.state_dict() for k, m in self.extra.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # a checkpoint written before the schedule was saved: no warmup in it
            self.scheduler.load_state_dict(state["scheduler"])
        for key, module in self.extra.items():
            module.load_state_dict(state[key])


def _sequence_advantage_loss(r: Rollouts, logp, advantages: torch.Tensor, clip_eps: float, kl_coef: float = 0.0):
    """Clipped surrogate with one advantage per sequence, plus an optional k3 KL-to-reference term."""
    loss, stats = L.clipped_surrogate(
        logp, r.logp_old, advantages[:, None].expand_as(logp), r.mask, clip_eps, r.is_weights
    )
    if kl_coef > 0:
        kl = L.masked_mean(L.kl_k3(logp, r.logp_ref), r.mask)
        loss = loss + kl_coef * kl
        stats["kl_term"] = kl.item()
    return loss, stats


@register_optimizer
class GRPO(PolicyOptimizer):
    """GRPO (Shao et al. 2024): group-normalized advantages, clipped ratio, k3 KL in the loss.

    Departure from the paper: the loss is averaged over all response tokens of the batch (sum of
    the per-token terms over every sequence, divided by the batch's total response-token count),
    not per sequence (1/|o_i|) and then over the group (1/G) as in the paper's eq. 3. Every token
    weighs the same, so a long response counts more than a short one (DAPO's token-level loss).
    Under data parallel each process averages over the tokens of its own shard and the gradients
    are then averaged over processes.
    """

    name = "grpo"
    min_samples = 2
    importance_sampling = True

    def row_local(self) -> bool:
        return True

    def loss(self, r, logp, entropy, hidden):
        adv = est.group_normalized(r.grouped(r.scores)).flatten()
        return _sequence_advantage_loss(r, logp, adv, self.cfg.clip_eps, self.cfg.kl_coef)


@register_optimizer
class RLOO(PolicyOptimizer):
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline on the KL-shaped sequence reward, clipped.

    The whole response is one action: one ratio per sequence (the exponentiated sum of its
    token log-ratios), clipped PPO-style and averaged over sequences, as TRL 1.16's RLOOTrainer
    does (``losses.sequence_clipped_surrogate``). Per-token ratios would clip each token on its
    own and, averaged over tokens, weigh a sequence by its length (DAPO's choice, which ``GRPO``
    here makes). With one inner step the ratio is 1 and only that weighting differs: 1/B per
    sequence rather than 1/(the batch's response tokens) per token.
    """

    name = "rloo"
    min_samples = 2
    importance_sampling = True
    per_sequence_is = True  # its ratio is the sequence's

    def row_local(self) -> bool:  # with the KL shaping, a row's advantage depends on its group's pi_old
        return not self.needs_ref

    def loss(self, r, logp, entropy, hidden):
        rewards = r.scores
        if self.needs_ref:
            rewards = rewards - self.cfg.kl_coef * L.seq_sum(r.logp_old - r.logp_ref, r.response_mask)
        adv = est.leave_one_out(r.grouped(rewards)).flatten()
        return L.sequence_clipped_surrogate(logp, r.logp_old, adv, r.mask, self.cfg.clip_eps, r.is_weights)


@register_optimizer
class MDLOO(PolicyOptimizer):
    """AFM's MDLOO: KL-shaped sequence reward, leave-one-out advantage, mirror-descent update.

    Departures from the (unpublished) AFM code, all exposed in the config: ``kl_coef`` is AFM's
    beta, ``mdloo_t`` the mirror-descent step size t, ``inner_steps`` the optimizer steps taken
    from pi_k per iteration (Tomar et al. use ~10). Advantages are fixed at pi_k for all inner steps.
    """

    name = "mdloo"
    min_samples = 2

    def loss(self, r, logp, entropy, hidden):
        logp_old_seq = L.seq_sum(r.logp_old, r.response_mask)
        logp_ref_seq = L.seq_sum(r.logp_ref, r.response_mask) if self.needs_ref else logp_old_seq
        rewards = est.mdloo_rewards(r.scores, logp_old_seq, logp_ref_seq, self.cfg.kl_coef)
        adv = est.leave_one_out(r.grouped(rewards)).flatten()
        return L.mirror_descent(logp, r.logp_old, adv, r.mask, t=self.cfg.mdloo_t)


@register_optimizer
class OnlineDPO(PolicyOptimizer):
    """Qwen2's online DPO: the best and worst of the K samples (by reward) form a DPO pair.

    Prompts whose K rewards are all equal give no pair and are skipped (counted in ``pairs``).
    Optional (``nll_coef`` > 0): Llama 3's NLL term on the chosen responses, which keeps DPO from
    lowering the likelihood of the preferred answers along with the rejected ones: the mean NLL
    over all chosen tokens of the batch (``losses.chosen_nll``), the normalization of ``align
    dpo``'s ``nll`` (TRL's ``sft`` loss type).
    """

    name = "online_dpo"
    min_samples = 2
    masks_truncated = False  # a pair is two whole responses: --missing_eos_penalty ranks truncated ones lower instead

    @classmethod
    def uses_reference(cls, cfg: Any) -> bool:
        return True

    def loss(self, r, logp, entropy, hidden):
        grouped = r.grouped(r.scores)
        best, worst = grouped.argmax(-1), grouped.argmin(-1)
        valid = grouped.max(-1).values > grouped.min(-1).values
        offsets = torch.arange(r.n_prompts, device=grouped.device) * r.k
        chosen, rejected = (offsets + best)[valid], (offsets + worst)[valid]
        if len(chosen) == 0:
            return logp.sum() * 0.0, {"pairs": 0.0}
        seq = L.seq_sum(logp, r.mask)
        ref = L.seq_sum(r.logp_ref, r.mask)
        loss, stats = L.dpo_sigmoid(seq[chosen], seq[rejected], ref[chosen], ref[rejected], self.cfg.beta)
        if self.cfg.nll_coef > 0:  # Llama 3's NLL term: per chosen token, pooled as in align dpo
            nll = L.chosen_nll(logp[chosen], r.mask[chosen])
            loss = loss + self.cfg.nll_coef * nll
            stats["nll"] = nll.item()
        return loss, {**stats, "pairs": float(len(chosen))}


@register_optimizer
class PPO(PolicyOptimizer):
    """PPO with a learned value head (Ouyang et al. 2022 setup; Schulman et al. 2017 losses).

    Per-token reward = -kl_coef * (log pi_old - log pi_ref) on every response token, plus the
    scorer's reward on the last one; advantages by GAE, whitened over the batch; clipped policy
    and value losses. Departure from a separate critic model: the value head is a linear layer on
    the policy's last hidden states (a shared trunk, as TRL's former value-head model did), which
    keeps memory at one model; ``vf_coef`` weighs its loss.
    """

    name = "ppo"
    min_samples = 1
    importance_sampling = True

    def extra_modules(self) -> dict[str, nn.Module]:
        head = nn.Linear(self.policy.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return {"value_head": head.to(next(self.policy.parameters()).device)}

    @torch.no_grad()
    def prepare(self, r, logp, entropy, hidden):
        stats = super().prepare(r, logp, entropy, hidden)
        rewards = torch.zeros_like(r.logp_old)
        if self.needs_ref:
            rewards -= self.cfg.kl_coef * (r.logp_old - r.logp_ref) * r.response_mask
        last = (r.response_mask * torch.arange(r.mask.shape[1], device=r.mask.device)).argmax(-1)
        rewards[torch.arange(len(last)), last] += r.scores
        adv, self._returns = est.gae(
            rewards, r.values_old * r.response_mask, r.response_mask, self.cfg.gamma, self.cfg.lam
        )
        self._advantages = est.whiten(adv, r.response_mask)
        return stats

    def loss(self, r, logp, entropy, hidden):
        policy_loss, stats = L.clipped_surrogate(
            logp, r.logp_old, self._advantages, r.mask, self.cfg.clip_eps, r.is_weights
        )
        value_loss, vstats = L.clipped_value_loss(
            self.values(hidden), r.values_old, self._returns, r.mask, self.cfg.clip_eps
        )
        return policy_loss + self.cfg.vf_coef * value_loss, {**stats, **vstats}
