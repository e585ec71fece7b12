"""How fast generation runs against what this machine can do: its fp32 matmul peak, measured.

A generated token costs about 2 x parameters FLOPs (one multiply-add per weight), a trained one
about 6 x parameters (forward and backward), so tokens/s x FLOPs per token over the measured peak
(``peak_fraction``) says how much of the machine a run used, on any CPU. ``align rs`` and ``align
rlhf`` report it at the end of a run (``generation_speed``); ``bench/`` quotes it beside its ratios.
The peak is measured, not looked up: the best of a few 2048^3 fp32 products at the run's thread
count, through torch's BLAS and through oneDNN, whichever is faster (``matmul_peaks_gflops``).
"""

from __future__ import annotations

import time
from typing import Any

# A run whose generation took less than this says more about start-up than about decoding speed:
# no peak is measured for it (the measurement itself takes about a second).
MIN_TIMED_SECONDS = 10.0


def _onednn_linear(a, b):
    """``a @ b.T`` through oneDNN (the library vLLM's CPU linear layers call), not torch's BLAS."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def matmul_peaks_gflops(threads: int, size: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best fp32 GFLOP/s of a size^3 product on ``threads`` threads (restored afterwards), per library:
    ``torch.mm`` (MKL in torch's x86 builds) and oneDNN's linear (when this torch has it).

    Both, because neither alone is the machine's limit everywhere: MKL runs its AVX2 kernels on AMD
    CPUs, AVX-512 ones included, so on a 2-core AVX-512 EPYC (Zen 5) ``torch.mm`` read 163-195 GFLOP/s
    and oneDNN 396-433, the same cores' 2 x 16-lane FMA limit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    libraries = {"torch.mm": torch.mm}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        libraries["oneDNN linear"] = _onednn_linear
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        peaks = {}
        for name, product in libraries.items():
            product(a, b)  # warm-up
            best = float("inf")
            for _ in range(reps):
                started = time.perf_counter()
                product(a, b)
                best = min(best, time.perf_counter() - started)
            peaks[name] = 2 * size**3 / best / 1e9
        return peaks
    finally:
        torch.set_num_threads(before)


def matmul_peak_gflops(threads: int, size: int = 2048, reps: int = 5) -> float:
    """The machine's fp32 matmul peak: the best of ``matmul_peaks_gflops``'s libraries."""
    return max(matmul_peaks_gflops(threads, size, reps).values())


def parameter_count(model: str) -> int:
    """Parameters of ``model`` (a folder, .gguf file or ``smollm2``: ``resolve_model_path``; tied
    embeddings counted once), from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.core.gguf import resolve_model_path

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    return sum(p.numel() for p in model.parameters())


def peak_fraction(tokens_per_s: float, flops_per_token: float, peak_gflops: float) -> float:
    """The share of the matmul peak a rate reaches (tokens/s x FLOPs per token / peak FLOP/s)."""
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)


def generation_speed(tokens: int, seconds: float, model: str, threads: int | None) -> dict[str, Any]:
    """``{"tokens_per_s", "matmul_peak_gflops", "peak_share"}`` of a CPU generation run: its rate
    and the share of this machine's fp32 matmul peak (measured now, on ``threads`` threads) it
    reached at 2 x parameters FLOPs a token. Only the rate for a run shorter than
    ``MIN_TIMED_SECONDS``, or without a thread count (a GPU, or the transformers engine)."""
    rate = tokens / seconds if seconds > 0 else 0.0
    out: dict[str, Any] = {"tokens_per_s": round(rate, 1)}
    if seconds < MIN_TIMED_SECONDS or not threads:
        return out
    peak = matmul_peak_gflops(threads)
    out["matmul_peak_gflops"] = round(peak, 1)
    out["peak_share"] = round(peak_fraction(rate, 2 * parameter_count(model), peak), 4)
    return out


def describe(speed: dict[str, Any], threads: int | None) -> str:
    """``generation_speed``'s figures as the end of a stage's last line says them."""
    text = f"{speed['tokens_per_s']:,.0f} tokens/s"
    if "peak_share" in speed:
        text += (
            f" on {threads} threads, {speed['peak_share']:.0%} of this machine's fp32 matmul peak"
            f" ({speed['matmul_peak_gflops']:.0f} GFLOP/s)"
        )
    return text
