"""LoRA dropout that is cheap on CPU: the same Bernoulli mask, drawn from 31-bit integers.

LoRA (Hu et al., arXiv 2106.09685) as peft implements it applies ``nn.Dropout(lora_dropout)``
to a linear layer's input before the adapter's down-projection, for every adapted layer
(``lora_A(dropout(x))``). On CPU, torch's dropout draws its mask with ``bernoulli_``, one float
at a time: on SmolLM2-135M (LoRA on all 7 linear layers of 30 blocks, 16 x 256 tokens, 2 threads)
the 210 masks of one training forward took 5.8 s in ``aten::bernoulli_`` alone, 16% of the
forward + backward (36 s, torch profiler); the forward without adapters took 11 s. Drawing the
mask as 31-bit integers (``random_``) and comparing them with ``p * 2**31`` gives the same
distribution for about half the cost (``F.dropout`` 36 ms a mask here, this one 18 ms).

Departure from ``nn.Dropout``: the drop probability is rounded to a multiple of 2**-31 (and the
kept values are scaled by the exact inverse of the resulting keep probability, so the layer stays
unbiased); the random stream differs from torch's, so runs are reproducible with a seed but not
bit-identical to peft's own dropout. Off the CPU it is ``F.dropout`` itself (CUDA's dropout is
one fused kernel), and in eval mode the identity, as ``nn.Dropout`` is.

Used by the trainer stages (sft, rm, dpo, distill: ``align.training.trainer.train_to_end`` swaps it in);
``align rlhf`` turns dropout off altogether (``align.rl.optimizers.disable_dropout``), as TRL does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_BITS = 31  # random_() on int32 draws uniformly from [0, 2**31)


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability ``1 - p`` and the scale ``1 / (1 - p)``.

    ``p`` is rounded to ``t / 2**31``; the scale is the exact inverse of the keep probability."""
    threshold = round(p * 2**SCALE_BITS)
    keep = torch.empty(shape, dtype=torch.int32, device=device).random_() >= threshold
    return keep, 2**SCALE_BITS / (2**SCALE_BITS - threshold)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` saving only the boolean mask for backward (a float mask is 4x larger)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class CpuFastDropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout(p)`` whose CPU training-mode mask comes from ``keep_mask``."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return _MaskedScale.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model: torch.nn.Module) -> int:
    """Replace every peft LoRA dropout (``lora_dropout[adapter]``, an ``nn.Dropout``) in ``model``
    with ``CpuFastDropout`` of the same ``p``; returns how many were replaced (0 without LoRA or
    with ``lora_dropout`` 0, where peft uses ``nn.Identity``). Dropout has no weights: adapters,
    checkpoints and merged models are unchanged."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                fast = CpuFastDropout(dropout.p)
                fast.train(dropout.training)
                dropouts[name] = fast
                replaced += 1
    return replaced
