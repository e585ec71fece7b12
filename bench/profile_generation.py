"""Where generation time goes: ``torch.profiler`` over one ``generate`` call of each engine.

    python bench/profile_generation.py --model smollm2 --prompts 16 --k 8 --max_tokens 64 --threads 2

Runs the vLLM engine (in-process, so its model runs on this thread and the profiler sees every
op) and the transformers engine on the same prompts (real Alpaca instructions when present) and
splits each call's wall time into op groups by self time: matrix multiplies (the linear layers and
the 49k-row LM head), attention, sampling, other torch ops, and the rest (Python: the scheduler,
input preparation, detokenization, outside any torch op). Next to it, what the matmuls would take
at the machine's measured fp32 matmul peak (2 x parameters FLOPs per token), the floor every
"share of the peak" in docs/benchmarks.md is measured against. The profiler adds a little time per op, so the
wall times here are a few percent above bench/bench_generation.py's. Prints a table per engine
and writes bench/results/profile_generation.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampling import SamplingParams, build_engine  # noqa: E402

from machine import cpu_info, matmul_peak_gflops, parameter_count, resolve_model, write_result  # noqa: E402
from real_prompts import CONTEXT, default_dataset, fitting_rows  # noqa: E402

# Op groups, matched in order on the lower-cased op name; the first that matches wins.
GROUPS = (
    ("matmul", ("mm", "addmm", "matmul", "bmm", "linear", "gemm", "onednn", "dnnl", "mkl")),
    ("attention", ("attention", "attn", "paged", "sdpa", "flash", "cache")),
    (
        "sampling",
        ("softmax", "topk", "top_k", "sort", "multinomial", "exponential", "argmax", "random", "sampl", "cumsum"),
    ),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other torch ops"


def profile(engine, prompts, params) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        out = engine.generate(prompts, params)
        wall = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for cands in out for c in cands)
    by_group: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_group[group_of(event.key)] = by_group.get(group_of(event.key), 0.0) + seconds
        top.append((seconds, event.key, event.count))
    by_group["outside torch ops (Python)"] = max(0.0, wall - sum(by_group.values()))
    top.sort(reverse=True)
    return {
        "wall_seconds": wall,
        "tokens": tokens,
        "groups": by_group,
        "top_ops": [{"op": k, "self_seconds": round(s, 3), "calls": n} for s, k, n in top[:12]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="model folder, .gguf file or 'smollm2'")
    ap.add_argument("--dataset", default=default_dataset())
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_generation.json"))
    args = ap.parse_args()

    model = resolve_model(args.model)
    prompts = [r["prompt"] for r, _ in fitting_rows(args.dataset, model, args.prompts, args.max_tokens)]
    params = SamplingParams(n=args.k, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.threads)
    flops_per_token = 2 * parameter_count(model)
    report = {
        "model": args.model,
        **cpu_info(),
        "threads": args.threads,
        "matmul_peak_gflops": round(peak, 1),
        "prompts": args.prompts,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "engines": {},
    }
    for name in args.engines.split(","):
        options = (
            {"kv_cache_gb": 3.0, "seed": 0, "threads": args.threads, "max_num_seqs": args.prompts * args.k}
            if name == "vllm"
            else {"batch_size": args.prompts}
        )
        engine = build_engine(name, model, max_model_len=CONTEXT, **options)
        engine.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=0))  # warm-up
        result = profile(engine, prompts, params)
        engine.close()
        result["matmul_seconds_at_peak"] = result["tokens"] * flops_per_token / (peak * 1e9)
        report["engines"][name] = result
        wall = result["wall_seconds"]
        print(
            f"\n{name}: {result['tokens']} tokens in {wall:.1f} s ({result['tokens'] / wall:.0f} tokens/s); "
            f"at the matmul peak ({peak:.0f} GFLOP/s) the weights' FLOPs take {result['matmul_seconds_at_peak']:.1f} s"
        )
        for group, seconds in sorted(result["groups"].items(), key=lambda kv: -kv[1]):
            print(f"  {group:<30}{seconds:>8.2f} s {seconds / wall:>6.1%}")
        print("  top ops: " + "; ".join(f"{t['op']} {t['self_seconds']:.2f} s" for t in result["top_ops"][:6]))
    write_result(args.out, report)


if __name__ == "__main__":
    main()
