"""Weight-merging methods: pure functions from tensors to one merged tensor, in a registry.

``align merge`` (``align.stages.merge``) applies a method to every tensor of its models, one
tensor name at a time. Each method computes in float64 and returns float32, so combining copies
of one model gives that model back bit for bit (the float64 error is far below a float32 ulp).

- ``average``: the weighted mean of the models' tensors, Llama 3's model soup (Dubey et al. 2024,
  sec. 4.1.5: "average models obtained from experiments using various versions of data or
  hyperparameters at each RM, SFT, or DPO stage"; Wortsman et al. 2022). Weights are normalized
  to sum to 1.
- ``slerp``: WARP's merge (Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded
  Policies", as Gemma 2 sec. 4 cites it): the task vectors tau_i = theta_i - theta_base of two
  RL runs are combined by spherical interpolation, then the result is moved back toward the base
  by linear interpolation: theta = base + eta * slerp(tau_1, tau_2; t). Departures from WARP: the
  SLERP is per tensor (each flattened tensor is one vector, as WARP's code does per layer) and of
  exactly two models; WARP's M > 2 case and its iteration over rounds are left to the recipe, which
  can chain merge stages pairwise. Where the angle is ~0 (parallel task vectors, or a zero one) the
  interpolation is linear, as SLERP's limit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from align.core.registry import Registry

# Below this angle (radians) between two task vectors, sin(omega) is too small to divide by and
# SLERP equals linear interpolation to float64 precision anyway.
PARALLEL_OMEGA = 1e-6


def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, in float64, returned as float32."""
    total = float(sum(weights))
    out = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        out += tensor.to(torch.float64) * (weight / total)
    return out.to(torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
    """Spherical interpolation of two tensors seen as flat vectors; returns (result, was_linear).

    omega = arccos(<a,b> / (|a||b|)); slerp = sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b.
    t = 0 and t = 1 return ``a`` and ``b`` exactly; a (near-)zero angle or a zero vector falls back to
    (1 - t) a + t b. Computed in the inputs' dtype (float64 from ``warp``).
    """
    if t == 0.0:
        return a.clone(), False
    if t == 1.0:
        return b.clone(), False
    norms = a.norm() * b.norm()
    if norms == 0:
        return (1 - t) * a + t * b, True
    cos = (a.flatten() @ b.flatten() / norms).clamp(-1.0, 1.0).item()
    omega = math.acos(cos)
    if omega < PARALLEL_OMEGA:
        return (1 - t) * a + t * b, True
    sin = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin) * a + (math.sin(t * omega) / sin) * b, False


def warp(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float, eta: float) -> tuple[torch.Tensor, bool]:
    """base + eta * slerp(a - base, b - base; t), in float64, returned as float32 (and was_linear)."""
    base64 = base.to(torch.float64)
    merged, linear = slerp(a.to(torch.float64) - base64, b.to(torch.float64) - base64, t)
    if eta != 1.0:
        merged = eta * merged
    return (base64 + merged).to(torch.float32), linear


# ---------------------------------------------------------------------------------------------
# Registry: name -> how to merge one tensor given every model's copy (and the base's, if needed)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    merge: Callable[[list[torch.Tensor], torch.Tensor | None, Any], tuple[torch.Tensor, bool]]
    needs_base: bool
    max_models: int | None  # None: any number
    source: str


METHODS: Registry[MergeMethod] = Registry("merge method")

METHODS.register(
    "average",
    MergeMethod(
        lambda tensors, base, cfg: (average(tensors, cfg.resolved_weights()), False),
        needs_base=False,
        max_models=None,
        source="Llama 3 model soup: weighted mean of the weights",
    ),
)
METHODS.register(
    "slerp",
    MergeMethod(
        lambda tensors, base, cfg: warp(base, tensors[0], tensors[1], cfg.t, cfg.eta),
        needs_base=True,
        max_models=2,
        source="WARP (Gemma 2): base + eta * slerp(task vectors; t)",
    ),
)
