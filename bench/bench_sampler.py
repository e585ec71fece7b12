"""One decode step's random sampling on CPU: vLLM's fused Gumbel-max kernel against align's
chunked inverse CDF (sampling/cpu_sampler.py), on the same logits, in one process.

    python bench/bench_sampler.py [--rows 512] [--vocab 49152] [--threads 2] [--reps 20]

The default size is the generation benchmark's batch on SmolLM2-135M (64 prompts x K=8
sequences decoded together, a 49,152-token vocabulary). Both are timed on a fresh copy of the
logits per call (align's sampler overwrites them in place, as vLLM allows); the copy is timed
alone and subtracted. Alternating rounds, fastest of ``--reps`` each; also checks that the two
samplers' token frequencies agree on a small vocabulary. Prints a ratio table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampling.cpu_sampler import sample_rows  # noqa: E402

from machine import cpu_info, write_result  # noqa: E402


def fastest(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_sampler.json"))
    args = ap.parse_args()

    import vllm._C  # noqa: F401  (registers torch.ops._C.fused_gumbel_argmax)

    from align.core.heap import keep_freed_memory

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3
    work = torch.empty_like(logits)
    seeds = torch.randint(0, 2**31, (args.rows,), dtype=torch.long)
    u = torch.rand(args.rows, dtype=torch.float64)
    with keep_freed_memory():  # as in VLLMEngine.generate
        copy = fastest(lambda: work.copy_(logits), args.reps)
        vllm_s = fastest(lambda: torch.ops._C.fused_gumbel_argmax(work.copy_(logits), seeds), args.reps) - copy
        align_s = fastest(lambda: sample_rows(work.copy_(logits), u), args.reps) - copy

    small = torch.randn(1, 300) * 2  # agreement: 200k draws of one 300-token row from each
    draws = 200_000
    g = torch.ops._C.fused_gumbel_argmax(
        small.expand(draws, -1).contiguous(), torch.randint(0, 2**31, (draws,), dtype=torch.long)
    )
    a = sample_rows(small.expand(draws, -1).clone(), torch.rand(draws, dtype=torch.float64))
    p = small.softmax(-1)[0].double()
    gap = lambda tokens: float((torch.bincount(tokens, minlength=300).double() / draws - p).abs().max())  # noqa: E731

    result = {
        **cpu_info(),
        "threads": torch.get_num_threads(),
        "rows": args.rows,
        "vocab": args.vocab,
        "reps": args.reps,
        "copy_ms": round(copy * 1e3, 2),
        "vllm_fused_gumbel_argmax_ms": round(vllm_s * 1e3, 2),
        "align_sample_rows_ms": round(align_s * 1e3, 2),
        "vllm_over_align": round(vllm_s / align_s, 2),
        "max_frequency_gap_vs_softmax": {"vllm": round(gap(g), 5), "align": round(gap(a), 5), "draws": draws},
    }
    print(
        f"{result['cpu']}, {result['threads']} threads, {args.rows} x {args.vocab} fp32 logits, fastest of {args.reps}"
    )
    print(
        f"| sampler | ms per step | ratio |\n|---|---|---|\n| vLLM fused_gumbel_argmax | {vllm_s * 1e3:.1f} | 1.00x |\n"
        f"| align sample_rows | {align_s * 1e3:.1f} | {vllm_s / align_s:.2f}x faster |"
    )
    print(
        f"largest |frequency - softmax| over {draws} draws of a 300-token row: vLLM {gap(g):.4f}, align {gap(a):.4f}"
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
