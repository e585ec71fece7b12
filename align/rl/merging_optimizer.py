"""Qwen2's Online Merging Optimizer: AdamW that merges each update with the SFT task vector.

Lu et al. 2024, "Online Merging Optimizers for Boosting Rewards and Mitigating Tax in
Alignment" (used by Qwen2, arXiv 2407.10671 sec. 4.2): instead of merging the aligned model with
the SFT model once at the end, every optimizer step merges the Adam update D with the SFT task
vector tau = theta_sft - theta_base, steering the preference updates along the direction SFT
took from the pre-trained base and so limiting the "alignment tax". Two variants:

- **OnDARE** (DARE, Yu et al. 2024): tau~ = clamp(dare(tau), -clip, clip) once; each step
  theta <- theta + alpha * tau~ + (1 - alpha) * dare(D), where dare(x) drops each entry with
  probability 1 - p and rescales the kept ones by 1/p.
- **OnTIES** (TIES, Yadav et al. 2023): tau~ = top_p(tau) once (the largest-magnitude fraction
  p); each step D~ = top_p(D), then TIES' sign consensus: the elected sign of each entry is that of
  tau~ + D~ (>= 0 counts as +), entries of tau~ and D~ with the other sign are zeroed, and
  theta <- theta + alpha * tau~' + (1 - alpha) * D~'.

Then decoupled weight decay on the result: theta <- theta (1 - lr * weight_decay).

This follows the authors' code (github.com/QwenLM/online_merging_optimizers, ``ODAdamW`` and
``OTAdamW``) in the details the paper leaves open: the Adam update is
D = -lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) (the bias correction folded into the
step size, as in transformers' former AdamW); the consensus sign uses the unweighted sum; tau~ is
clamped (OnDARE only); top-p keeps the whole tensor when p * size < 1; the same alpha * tau~ is
added at every step; and the defaults p = 0.01, alpha = 1e-7 are their example script's. Departures:
the authors' optional L1 rescaling and k-step merging (``rescale``, ``online_step``) are left out;
DARE masks come from a seeded generator of their own (saved with the optimizer state) so every
process of a data-parallel run draws the same masks and a resumed run continues the same sequence;
parameters without a task vector (PPO's value head) take plain AdamW steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch

from align.core.config import option
from align.core.errors import ConfigError, ModelError, did_you_mean

# ---------------------------------------------------------------------------------------------
# Pure update math
# ---------------------------------------------------------------------------------------------


def adam_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """Update the moments in place and return the Adam step D (to be added to the parameter)."""
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return -step_size * exp_avg / (exp_avg_sq.sqrt() + eps)


def dare(x: torch.Tensor, keep_p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1 - keep_p (mask: uniform draw < keep_p), rescale by 1/keep_p."""
    keep = torch.rand(x.shape, generator=generator) < keep_p
    return x * keep.to(device=x.device, dtype=x.dtype) / keep_p


def top_magnitude(x: torch.Tensor, keep_p: float) -> torch.Tensor:
    """Keep the int(keep_p * size) largest-magnitude entries, zero the rest (all kept if that is < 1)."""
    k = int(keep_p * x.numel())
    if keep_p >= 1 or k < 1:
        return x.clone()
    keep = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    keep[x.abs().flatten().topk(k).indices] = 1
    return x * keep.view_as(x)


def ties_consensus(tau: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the entries of tau and delta whose sign differs from the sign of tau + delta (>= 0 is +)."""
    elected = torch.where(tau + delta >= 0, 1.0, -1.0).to(tau.dtype)
    return tau * (tau.sign() == elected), delta * (delta.sign() == elected)


# ---------------------------------------------------------------------------------------------
# The two variants: how tau is sparsified once, and how each step merges tau~ with D
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeMode:
    sparsify_tau: Callable[[torch.Tensor, "OnlineMergingAdamW"], torch.Tensor]
    merge: Callable[[torch.Tensor, torch.Tensor, "OnlineMergingAdamW"], torch.Tensor]  # (tau~, D) -> parameter change
    source: str


def _ondare_merge(tau: torch.Tensor, delta: torch.Tensor, opt: "OnlineMergingAdamW") -> torch.Tensor:
    return opt.alpha * tau + (1 - opt.alpha) * dare(delta, opt.reserve_p, opt.generator)


def _onties_merge(tau: torch.Tensor, delta: torch.Tensor, opt: "OnlineMergingAdamW") -> torch.Tensor:
    tau, delta = ties_consensus(tau, top_magnitude(delta, opt.reserve_p))
    return opt.alpha * tau + (1 - opt.alpha) * delta


MODES: dict[str, MergeMode] = {
    "ondare": MergeMode(
        lambda tau, opt: dare(tau, opt.reserve_p, opt.generator).clamp(-opt.clip, opt.clip),
        _ondare_merge,
        "random drop with keep-probability p, rescaled by 1/p",
    ),
    "onties": MergeMode(
        lambda tau, opt: top_magnitude(tau, opt.reserve_p), _onties_merge, "top-p magnitudes with TIES sign consensus"
    ),
}


class OnlineMergingAdamW(torch.optim.Optimizer):
    """AdamW whose every step is merged with a sparsified task vector (see the module docstring).

    ``task_vectors``: (parameter, theta_sft - theta_base) pairs, sparsified here once, at
    construction, so the parameters must still hold theta_sft then (see ``task_vectors``).
    """

    def __init__(
        self,
        params,
        task_vectors: Iterable[tuple[torch.Tensor, torch.Tensor]],
        mode: str,
        reserve_p: float,
        alpha: float,
        clip: float = 1.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.mode = MODES[mode]
        self.reserve_p, self.alpha, self.clip = reserve_p, alpha, clip
        self.generator = torch.Generator().manual_seed(seed)
        for param, tau in task_vectors:
            self.state[param]["tau"] = self.mode.sparsify_tau(tau.detach().to(param.dtype), self)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                delta = adam_update(
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["step"],
                    group["lr"],
                    group["betas"],
                    group["eps"],
                )
                if "tau" in state:
                    delta = self.mode.merge(state["tau"], delta, self)
                p.add_(delta)
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dare_rng": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("dare_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self.generator.set_state(rng)


# ---------------------------------------------------------------------------------------------
# Options shared by align dpo and align rlhf, and the construction from them
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OnlineMergingOptions:
    """Fields of the stages that can train with the Online Merging Optimizer (mixed into configs)."""

    optimizer_merge: str = option(
        "none",
        "Qwen2's Online Merging Optimizer (Lu et al. 2024) instead of AdamW: "
        + "; ".join(f"{n} ({m.source})" for n, m in MODES.items())
        + "; none: plain AdamW.",
    )
    merge_base: str | None = option(
        None,
        "optimizer_merge: the pre-trained model the starting (SFT) policy was fine-tuned from; tau = policy - merge_base.",
    )
    merge_reserve_p: float = option(
        0.01,
        "optimizer_merge: p, the fraction of entries kept when sparsifying tau and each update (authors' example: 0.01).",
    )
    merge_alpha: float = option(
        1e-7,
        "optimizer_merge: alpha, the weight of tau in each step: alpha * tau + (1 - alpha) * update (authors' example: 1e-7).",
    )
    merge_clip: float = option(
        1.0, "optimizer_merge ondare: the sparsified tau is clamped to [-clip, clip] (authors' code: 1)."
    )

    def validate_merging(self, lora: bool) -> None:
        if self.optimizer_merge == "none":
            return
        if self.optimizer_merge not in MODES:
            hint = did_you_mean(self.optimizer_merge, MODES)
            raise ConfigError(
                f"unknown optimizer_merge '{self.optimizer_merge}'{hint}; valid: none, {', '.join(MODES)}"
            )
        if not self.merge_base:
            raise ConfigError(
                f"optimizer_merge '{self.optimizer_merge}' needs 'merge_base': the model the policy was fine-tuned from"
            )
        if lora:
            raise ConfigError(
                "optimizer_merge merges full weights with their SFT task vector; it does not work with"
                " use_lora or load_in_4bit"
            )
        if not 0.0 < self.merge_reserve_p <= 1.0:
            raise ConfigError(f"'merge_reserve_p' must be in (0, 1], got {self.merge_reserve_p}")
        if not 0.0 <= self.merge_alpha <= 1.0:
            raise ConfigError(f"'merge_alpha' must be in [0, 1], got {self.merge_alpha}")
        if self.merge_clip <= 0:
            raise ConfigError(f"'merge_clip' must be positive, got {self.merge_clip}")

    def merging_kwargs(self, model, seed: int) -> dict[str, Any]:
        """``OnlineMergingAdamW`` keyword arguments besides params and the Adam hyper-parameters."""
        return {
            "task_vectors": task_vectors(model, self.merge_base),
            "mode": self.optimizer_merge,
            "reserve_p": self.merge_reserve_p,
            "alpha": self.merge_alpha,
            "clip": self.merge_clip,
            "seed": seed,
        }


def task_vectors(model, base_path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, parameter - base's same-named tensor) for every trainable parameter of ``model``."""
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load merge_base {base_path}: {str(err).strip().splitlines()[0]}") from None
    base_params = dict(base.named_parameters())
    pairs = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in base_params:
            raise ModelError(
                f"merge_base {base_path} has no tensor '{name}' of the policy; give the model the policy was"
                " fine-tuned from"
            )
        if base_params[name].shape != param.shape:
            raise ModelError(
                f"tensor '{name}' has shape {tuple(param.shape)} in the policy but"
                f" {tuple(base_params[name].shape)} in merge_base {base_path}"
            )
        pairs.append((param, param.detach() - base_params[name].detach().to(param.device, param.dtype)))
    return pairs
