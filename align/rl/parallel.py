"""Data parallelism for the experience loop: one engine per rank, gradients averaged.

Under ``accelerate launch`` (or torchrun) each process is a rank that owns a full policy, its
own in-process engine and a shard of every prompt batch (``batch[rank::world]``). It generates,
scores and computes its loss on that shard alone; after ``backward`` the gradients of every
trainable parameter (policy, LoRA adapters, PPO's value head) are averaged across ranks, so
every rank takes the same optimizer step and the policies, and hence the engines after their
own sync, stay identical without sending any weights between processes.

Why not DDP's module wrapper: the optimizers call the policy several times per step (no-grad
passes for the old and reference log-probs, PPO's value head beside it) and skip nothing, so the
explicit all-reduce after ``backward`` is the same arithmetic as DDP without wrapping the model.
Why an engine per rank rather than one engine and a broadcast: generation is most of an
iteration (metrics ``time_generate``), and an engine per rank splits it ``world`` ways.
Sharded weights (DeepSpeed ZeRO-3, FSDP) are not supported by this loop: a sync needs each
rank's full weights.

Everything here is a no-op in a single process, so the loop has one code path.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist


def init(device: str) -> tuple[int, int]:
    """(rank, world size); in a distributed launch, set up the process group through accelerate
    (gloo for CPU training, accelerate's default, e.g. NCCL, on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(backend="gloo") if device == "cpu" else PartialState()
    return state.process_index, state.num_processes


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient with its mean over ranks (a missing gradient counts as zeros)."""
    world = world_size()
    if world == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


__all__ = ["average_gradients", "barrier", "gather", "init", "world_size"]
