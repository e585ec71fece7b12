"""Online RL throughput: `align rlhf --optimizer rloo` vs TRL's RLOOTrainer, same model, prompts, K.

    python bench/bench_rlhf.py [--model DIR] [--dataset FILE|demo] [--iterations 10] [--prompts 32] [--k 4] [--max_tokens 64]

Both sides train the same model on the same prompts with the same reward, K, prompts per step,
max response length, learning rate and clip range, for the same number of optimizer steps.
Prompts: real Alpaca instructions (../shared/data/real/alpaca_en_demo.json) when present,
rewarded by a 40-character length budget (``rule:length_penalty``, reimplemented for TRL);
``--dataset demo``: the a+b= task with ``rule:arithmetic`` (tiny prompts and answers: per-step
overheads dominate there: generation's per-step cost and the fixed weight-reload cost).
Samples/s = completions generated and trained on / seconds of the training loop (model loading and
engine start excluded on both sides: our per-iteration time split; TRL's ``train_runtime``).

TRL's colocated vLLM mode is tried first; on CPU in fp32 its weight sync fails on some machines (docs/vllm-cpu.md#9), in
which case TRL runs with transformers generation and the table says so. Also reports the share
of our iteration time spent on weight sync (goal: at most 5%). Writes bench/results/rlhf.json.
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
sys.path.insert(0, str(ROOT))

from real_prompts import CONTEXT, default_dataset, fitting_rows  # noqa: E402  (bench/, beside this file)

MAX_CHARS = 40  # length_penalty's budget on real prompts: rewards vary, so advantages are not all zero

TRL_SCRIPT = r"""
import json, sys, time, os
from datasets import Dataset
from trl import RLOOConfig, RLOOTrainer
args = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(args["prompts"])][: args["n_prompts"]]
answers = {r["prompt"][-1]["content"]: r.get("answer") for r in rows}
def arithmetic(prompts, completions, **kw):  # align's rule:arithmetic
    return [float(c[0]["content"].strip() == answers[p[-1]["content"]]) for p, c in zip(prompts, completions)]
def length_penalty(prompts, completions, **kw):  # align's rule:length_penalty with max_chars = MAX_CHARS
    return [-max(0, len(c[0]["content"]) - MAX_CHARS) / MAX_CHARS for c in completions]
ds = Dataset.from_list([{"prompt": r["prompt"]} for r in rows] * (args["steps"] + 1))
cfg = RLOOConfig(output_dir=args["out"], per_device_train_batch_size=args["n_prompts"] * args["k"],
    num_generations=args["k"], max_completion_length=args["max_tokens"], max_steps=args["steps"],
    learning_rate=args["lr"], epsilon=0.2, beta=args["kl"], temperature=1.0, bf16=False, use_cpu=True,
    report_to="none", logging_steps=1, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
    use_vllm=args["vllm"], vllm_mode="colocate", vllm_gpu_memory_utilization=0.2,
    vllm_max_model_length=CONTEXT, shuffle_dataset=False, seed=0)
trainer = RLOOTrainer(model=args["model"], reward_funcs=globals()[args["reward"]], args=cfg, train_dataset=ds)
out = trainer.train()
print("RESULT", json.dumps({"train_runtime": out.metrics["train_runtime"]}))
"""


def run_trl(model: str, prompts: Path, a, use_vllm: bool, tmp: Path) -> dict:
    spec = {"model": model, "prompts": str(prompts), "reward": a.reward, "n_prompts": a.prompts, "k": a.k, "max_tokens": a.max_tokens,
            "steps": a.iterations, "lr": a.lr, "kl": a.kl, "vllm": use_vllm, "out": str(tmp / f"trl-{use_vllm}")}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = TRL_SCRIPT.replace("MAX_CHARS", str(MAX_CHARS)).replace("CONTEXT", str(CONTEXT))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            runtime = json.loads(line[7:])["train_runtime"]
            return {"ok": True, "seconds": runtime, "samples_per_s": a.iterations * a.prompts * a.k / runtime}
    tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
    return {"ok": False, "error": tail[0][:200]}


def run_ours(model: str, prompts: Path, a, tmp: Path) -> dict:
    out = tmp / "ours"
    cmd = [str(Path(sys.executable).parent / "align"), "rlhf", "--model_name_or_path", model, "--dataset", str(prompts),
           "--reward", f"rule:{a.reward}", "--optimizer", "rloo", "--num_iterations", str(a.iterations),
           "--prompts_per_iteration", str(a.prompts), "--num_samples", str(a.k), "--max_tokens", str(a.max_tokens),
           "--learning_rate", str(a.lr), "--kl_coef", str(a.kl), "--clip_eps", "0.2", "--max_model_len", str(CONTEXT),
           "--save_every", str(a.iterations), "--output_dir", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    split = {k: sum(r[k] for r in rows) for k in ("time_generate", "time_score", "time_train", "time_sync")}
    seconds = sum(split.values())
    return {"ok": True, "seconds": seconds, "samples_per_s": a.iterations * a.prompts * a.k / seconds,
            "sync_fraction": split["time_sync"] / seconds, **{k: round(v, 3) for k, v in split.items()}}


def write_prompts(dataset: str, n: int, model: str, max_tokens: int, out: Path) -> Path:
    """The first ``n`` prompts of ``dataset`` that fit the context with ``max_tokens`` to spare,
    as prompt rows with a ``max_chars`` budget."""
    rows = [r for r, _ in fitting_rows(dataset, model, n, max_tokens)]
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "prompt_id": r["prompt_id"], "max_chars": MAX_CHARS}) + "\n" for r in rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="policy folder (default: a random tiny llama, BPE tokenizer)")
    ap.add_argument("--dataset", default=default_dataset(),
                    help="prompt file, or 'demo' for the a+b= task (default: real Alpaca prompts if present)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl", type=float, default=0.0)
    a = ap.parse_args()

    from align.demo import write_demo_data
    from align.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = a.model or str(make_tiny_model(tmp / "tiny", tokenizer="bpe"))
        if a.dataset == "demo":  # rewarded by the arithmetic rule
            a.reward, prompts = "arithmetic", write_demo_data(tmp / "demo")["prompts"]
        else:  # instructions, rewarded by a length budget (no reference answers needed)
            a.reward, prompts = "length_penalty", write_prompts(a.dataset, a.prompts, model, a.max_tokens, tmp / "prompts.jsonl")
        ours = run_ours(model, prompts, a, tmp)
        trl_vllm = run_trl(model, prompts, a, True, tmp)
        trl = trl_vllm if trl_vllm["ok"] else run_trl(model, prompts, a, False, tmp)

    baseline = "TRL RLOOTrainer + colocated vLLM" if trl_vllm["ok"] else "TRL RLOOTrainer + transformers generate"
    result = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "settings": vars(a),
        "ours": ours, "trl": trl, "trl_baseline": baseline,
        "trl_colocated_vllm_error": None if trl_vllm["ok"] else trl_vllm["error"],
        "speedup_samples_per_s": ours["samples_per_s"] / trl["samples_per_s"] if trl["ok"] else None,
    }
    print(f"{'path':45s} {'samples/s':>10s} {'ratio':>7s}")
    print(f"{'align rlhf --optimizer rloo (in-process vLLM)':45s} {ours['samples_per_s']:10.1f} {result['speedup_samples_per_s'] or float('nan'):7.2f}x")
    if trl["ok"]:
        print(f"{baseline:45s} {trl['samples_per_s']:10.1f} {1.0:7.2f}x")
    else:
        print(f"{baseline:45s} failed: {trl['error']}")
    if not trl_vllm["ok"]:
        print(f"TRL colocated vLLM on CPU failed: {trl_vllm['error']}")
    print(f"weight sync share of our iteration time: {ours['sync_fraction']:.1%}")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "rlhf.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
