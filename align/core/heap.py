"""Keep freed memory in the process while ``align rlhf`` runs on the CPU (glibc's ``mallopt``).

CPU training allocates the same large tensors every step (activations, the logits of a 49k
vocabulary, their gradients). glibc's ``malloc`` serves blocks above its mmap threshold (128
KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and gives them back to the kernel
on ``free``, and trims the top of its heap when more than twice that is free, so each step
page-faults much of its memory in again and the kernel zeroes every page while the other OpenMP
threads wait. In ``bench/bench_sft.py`` (SmolLM2-135M, LoRA, 2-core Intel Xeon) both sides'
workers, ours and TRL's, spent 36-41% of their CPU time in the kernel that way.

``keep_freed_memory`` sets ``M_MMAP_MAX`` to 0 (every block comes from the heap) and
``M_TRIM_THRESHOLD`` to 2 GiB (freed memory stays for the next step), then restores glibc's
defaults and hands the free pages back (``malloc_trim``) when the block ends, so a notebook's
process shrinks again afterwards. Only for work on the CPU: ``align rlhf`` on a GPU and the vLLM
engine on a GPU run without it. Large requests glibc cannot take from the heap still fall back
to ``mmap``. vLLM's CPU install guide reaches the same end by preloading tcmalloc; this needs no
preload and no restart. A no-op off glibc (macOS, musl) and with ``ALIGN_KEEP_FREED_MEMORY=0``.

Measured (2-core Intel Xeon, AVX-512, torch 2.13, 2 threads, SmolLM2-135M):
- ``align rlhf --optimizer grpo --use_lora`` (``bench/bench_rlhf.py``, 16 prompts x K=4 x 32
  tokens): training 25.5 s an iteration instead of 29.0, 2.22x TRL GRPOTrainer's samples/s
  instead of 1.92x; peak RSS 0.99x TRL's instead of 0.95x. Hence it wraps ``run_rlhf``.
- ``align sft`` with LoRA, 32 rows: 36.1 s instead of 39.8-40.5 (~10%; 36.6 with a fixed 32 MiB mmap
  threshold instead of none), the same peak RSS
  under glibc's defaults (7.8-7.9 GB either way), but the peak of live-plus-retained memory the
  benchmark records (``MALLOC_MMAP_THRESHOLD_`` fixed, ``bench/machine.py``) went from 0.62x to
  1.00x TRL's; ``align dpo``: no gain with a live or cached reference and 1.02-1.03x TRL's memory
  when cached. So sft, rm and dpo run without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
ENV = "ALIGN_KEEP_FREED_MEMORY"

_depth = 0  # nested stages (a stage called from another's Python code) set and restore once
F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and others lack them
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off") and glibc() is not None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within the block, freed memory stays in the process for reuse (module docstring).
    Yields whether the setting took effect."""
    global _depth
    if not enabled():
        yield False
        return
    libc = glibc()
    if _depth == 0:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


def keeps_freed_memory(run: F) -> F:
    """Decorator: run a stage inside ``keep_freed_memory`` when it trains on the CPU (its config's
    ``resolved_device()``; a config without one counts as CPU). A GPU run's tensors live in the
    CUDA caching allocator, so the setting would only keep host memory it does not reuse."""

    @functools.wraps(run)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        device = getattr(cfg, "resolved_device", None)
        if device is not None and device() != "cpu":
            return run(cfg, *args, **kwargs)
        with keep_freed_memory():
            return run(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
