"""Online RL throughput and memory: `align rlhf` vs TRL's GRPO/RLOO trainers vs a bare torch loop.

    python bench/bench_rlhf.py [--model DIR|smollm2] [--optimizer rloo|grpo] [--use_lora]
                               [--iterations 10] [--prompts 32] [--k 4] [--max_tokens 64]

The real-model setting (SmolLM2-135M-Instruct, LoRA, GRPO, 16 prompts x K=4 x 32 tokens):

    python bench/bench_rlhf.py --model smollm2 --optimizer grpo --use_lora --prompts 16 --k 4 --max_tokens 32 --iterations 4

Both trainers train the same model on the same prompts with the same reward, optimizer (GRPO:
group-normalized advantages, token-level loss, k3 KL in the loss; RLOO: leave-one-out), K,
prompts per step, max response length, learning rate, clip range, KL coefficient and LoRA
settings (r 16, alpha 32, all linear layers), for the same number of optimizer steps, each in
its own process. Prompts: real Alpaca instructions (../shared/data/real/alpaca_en_demo.json)
when present, rewarded by a 40-character length budget (``rule:length_penalty``, reimplemented
for TRL); ``--dataset demo``: the a+b= task with ``rule:arithmetic``.

Samples/s = completions generated and trained on / seconds of the training loop (model loading and
engine start excluded on both sides: our per-iteration time split; TRL's ``train_runtime``).
TRL's colocated vLLM mode is tried first (``--trl_generation auto``); on CPU in fp32 its weight
sync fails on some machines (docs/vllm-cpu.md#9), and TRL then runs with transformers
generation; the table says which.

Also measured:
* weight sync's share of our iteration time (goal <= 5%);
* our training phase (log-probs, reference, loss, backward, step: the ``time_train`` of each
  iteration) against a bare torch loop doing the same passes on the same prompts with responses
  of the same mean length (``--worker bare``: per micro-batch of the padded batch, the reference
  forward with the adapter disabled or a frozen copy, the policy forward with gradients through a
  plain ``log_softmax(...).gather``, the GRPO-style loss and its backward; then clip and AdamW)
  -- goal: within 1.3x; medians over iterations. The bare loop runs twice: under glibc's defaults
  (each step's activations are mapped, freed and faulted back in) and with glibc keeping freed
  memory as ``align rlhf`` does (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_``, align/core/heap.py), so
  the ratio is also quoted against the faster, fairer loop;
* every side runs its forward/backward passes ``--micro_batch`` rows at a time (ours:
  ``--forward_batch_size``; TRL: ``per_device_train_batch_size`` with gradient accumulation up to
  the prompts x K completions of one generation, one optimizer step per generation as ours): at 64
  rows in one pass TRL's GRPOTrainer outgrew this machine's 24 GB and was killed (2 of 2 runs);
* each process's peak RSS (``ru_maxrss`` from ``wait4``: model, optimizer, engine and its KV
  cache, everything the process held) -- goal: ours no higher than TRL's;
* the training phase's share of the fp32 matmul peak measured in the same run (6 x parameters
  FLOPs per trained token, prompt and response tokens).

Prints a table and writes bench/results/rlhf.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.core.heap import KEEP_TRIM_THRESHOLD  # noqa: E402

from machine import cpu_info, matmul_peak_gflops, parameter_count, peak_fraction, resolve_model, write_result  # noqa: E402
from real_prompts import CONTEXT, default_dataset, fitting_rows  # noqa: E402  (bench/, beside this file)

MAX_CHARS = 40  # length_penalty's budget on real prompts: rewards vary, so advantages are not all zero
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
}  # align's defaults (align/training/models.py), given to TRL too

TRL_SCRIPT = r"""
import json, sys
from datasets import Dataset
import trl
args = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(args["prompts"])][: args["n_prompts"]]
answers = {r["prompt"][-1]["content"]: r.get("answer") for r in rows}
def arithmetic(prompts, completions, **kw):  # align's rule:arithmetic
    return [float(c[0]["content"].strip() == answers[p[-1]["content"]]) for p, c in zip(prompts, completions)]
def length_penalty(prompts, completions, **kw):  # align's rule:length_penalty with max_chars = MAX_CHARS
    return [-max(0, len(c[0]["content"]) - MAX_CHARS) / MAX_CHARS for c in completions]
ds = Dataset.from_list([{"prompt": r["prompt"]} for r in rows] * (args["steps"] + 1))
Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[args["optimizer"]]
extra = {"loss_type": "dapo", "scale_rewards": "group"} if args["optimizer"] == "grpo" else {}
cfg = Config(output_dir=args["out"], per_device_train_batch_size=args["micro_batch"],
    gradient_accumulation_steps=args["n_prompts"] * args["k"] // args["micro_batch"], num_generations=args["k"], max_completion_length=args["max_tokens"], max_steps=args["steps"],
    learning_rate=args["lr"], epsilon=0.2, beta=args["kl"], temperature=1.0, bf16=False, use_cpu=True,
    report_to="none", logging_steps=1, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
    use_vllm=args["vllm"], vllm_mode="colocate", vllm_gpu_memory_utilization=0.2,
    vllm_max_model_length=CONTEXT, shuffle_dataset=False, seed=0, **extra)
peft_config = None
if args["lora"]:
    from peft import LoraConfig
    peft_config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **args["lora"])
trainer = Trainer(model=args["model"], reward_funcs=globals()[args["reward"]], args=cfg, train_dataset=ds, peft_config=peft_config)
out = trainer.train()
print("RESULT", json.dumps({"train_runtime": out.metrics["train_runtime"]}))
"""


def run_measured(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[int, str, str, float]:
    """Run ``cmd``; (exit code, stdout, stderr, the process's peak RSS in MB from ``wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024


def run_trl(model: str, prompts: Path, a, use_vllm: bool, tmp: Path) -> dict:
    spec = {
        "model": model,
        "prompts": str(prompts),
        "reward": a.reward,
        "n_prompts": a.prompts,
        "k": a.k,
        "max_tokens": a.max_tokens,
        "steps": a.iterations,
        "lr": a.lr,
        "kl": a.kl,
        "vllm": use_vllm,
        "out": str(tmp / f"trl-{use_vllm}"),
        "optimizer": a.optimizer,
        "lora": LORA if a.use_lora else None,
        "micro_batch": a.micro_batch,
    }
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = TRL_SCRIPT.replace("MAX_CHARS", str(MAX_CHARS)).replace("CONTEXT", str(CONTEXT))
    rc, stdout, stderr, rss = run_measured([sys.executable, "-c", script, json.dumps(spec)], env)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            runtime = json.loads(line[7:])["train_runtime"]
            return {
                "ok": True,
                "seconds": runtime,
                "samples_per_s": a.iterations * a.prompts * a.k / runtime,
                "peak_rss_mb": round(rss),
            }
    errors = [ln for ln in stderr.strip().splitlines() if "Error" in ln or "error" in ln][-1:] or ["no error message"]
    return {"ok": False, "error": f"exit code {rc}: {errors[0][:300]}"}


def run_ours(model: str, prompts: Path, a, tmp: Path) -> dict:
    out = tmp / "ours"
    cmd = [
        str(Path(sys.executable).parent / "align"),
        "rlhf",
        "--model_name_or_path",
        model,
        "--dataset",
        str(prompts),
        "--reward",
        f"rule:{a.reward}",
        "--optimizer",
        a.optimizer,
        "--num_iterations",
        str(a.iterations),
        "--prompts_per_iteration",
        str(a.prompts),
        "--num_samples",
        str(a.k),
        "--max_tokens",
        str(a.max_tokens),
        "--learning_rate",
        str(a.lr),
        "--kl_coef",
        str(a.kl),
        "--clip_eps",
        "0.2",
        "--max_model_len",
        str(CONTEXT),
        "--save_every",
        str(a.iterations),
        "--threads",
        str(a.engine_threads),
        "--forward_batch_size",
        str(a.micro_batch),
        "--output_dir",
        str(out),
    ]
    if a.use_lora:
        cmd += [
            "--use_lora",
            "true",
            "--lora_r",
            str(LORA["r"]),
            "--lora_alpha",
            str(LORA["lora_alpha"]),
            "--lora_dropout",
            str(LORA["lora_dropout"]),
        ]
    rc, _, stderr, rss = run_measured(cmd, dict(os.environ))
    if rc != 0:
        raise SystemExit(f"align rlhf failed (exit {rc}):\n{stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_train" in r]
    split = {k: sum(r[k] for r in rows) for k in ("time_generate", "time_score", "time_train", "time_sync")}
    seconds = sum(split.values())
    return {
        "ok": True,
        "seconds": seconds,
        "samples_per_s": a.iterations * a.prompts * a.k / seconds,
        "sync_fraction": split["time_sync"] / seconds,
        "peak_rss_mb": round(rss),
        "train_seconds_per_iteration": [round(r["time_train"], 3) for r in rows],
        "response_lengths": [r["response_length"] for r in rows],
        **{k: round(v, 3) for k, v in split.items()},
        "kv_cache_gb": json.loads((out / "stage.json").read_text())["summary"]["kv_cache_gb"],
    }


def bare_loop(spec: dict) -> dict:
    """The training phase as a bare torch loop (module docstring): per-iteration seconds, tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.stages.rlhf import batch_indices
    from sampling.base import encode_prompts

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reference = None
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy,
            LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **{**spec["lora"], "lora_dropout": 0.0}),
        )
    elif spec["kl"] > 0:
        reference = (
            AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
        )
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    rows = [json.loads(line) for line in open(spec["prompts"])]
    vocab = policy.config.vocab_size

    def logprobs(model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    seconds, tokens = [], []
    for it, length in enumerate(spec["response_lengths"]):
        batch = [rows[i] for i in batch_indices(len(rows), spec["n_prompts"], it, 0)]
        prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], None)
        seqs = [
            ids + torch.randint(0, vocab, (round(length),)).tolist() for ids in prompt_ids for _ in range(spec["k"])
        ]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id or 0)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(seqs), width - 1)
        for row, (seq, prompt) in enumerate(zip(seqs, [p for p in prompt_ids for _ in range(spec["k"])])):
            ids[row, : len(seq)], attn[row, : len(seq)] = torch.tensor(seq), 1
            mask[row, len(prompt) - 1 : len(seq) - 1] = 1.0
        advantages = torch.randn(len(seqs), 1)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for rows_mb in torch.arange(len(seqs)).split(spec["micro_batch"]):  # gradient accumulation
            ids_mb, attn_mb, mask_mb = ids[rows_mb], attn[rows_mb], mask[rows_mb]
            logp_ref = None
            if spec["kl"] > 0:
                with torch.no_grad():
                    if reference is None:
                        with policy.disable_adapter():
                            logp_ref = logprobs(policy, ids_mb, attn_mb)
                    else:
                        logp_ref = logprobs(reference, ids_mb, attn_mb)
            logp = logprobs(policy, ids_mb, attn_mb)
            ratio = torch.exp(logp - logp.detach())
            adv = advantages[rows_mb]
            per_token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
            if logp_ref is not None:
                per_token = per_token + spec["kl"] * (torch.exp(logp_ref - logp) - (logp_ref - logp) - 1)
            ((per_token * mask_mb).sum() / mask.sum()).backward()  # the batch's token mean, a micro-batch's share
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        tokens.append(int(attn.sum()))
    return {"train_seconds_per_iteration": [round(s, 3) for s in seconds], "trained_tokens_per_iteration": tokens}


# glibc's environment twins of the mallopt calls in align/core/heap.py: the bare loop then keeps its freed
# memory as `align rlhf` does, instead of faulting each step's activations back in.
HEAP_KEPT_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(KEEP_TRIM_THRESHOLD)}


def run_bare(model: str, prompts: Path, a, response_lengths: list[float], env: dict | None = None) -> dict:
    spec = {
        "model": model,
        "prompts": str(prompts),
        "n_prompts": a.prompts,
        "k": a.k,
        "lr": a.lr,
        "kl": a.kl,
        "lora": LORA if a.use_lora else None,
        "response_lengths": response_lengths,
        "micro_batch": a.micro_batch,
    }
    rc, stdout, stderr, rss = run_measured(
        [sys.executable, __file__, "--worker", "bare", "--spec", json.dumps(spec)], {**os.environ, **(env or {})}
    )
    if rc != 0:
        raise SystemExit(f"bare loop failed (exit {rc}):\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": round(rss)}


def write_prompts(dataset: str, n: int, model: str, max_tokens: int, out: Path) -> Path:
    """The first ``n`` prompts of ``dataset`` that fit the context with ``max_tokens`` to spare,
    as prompt rows with a ``max_chars`` budget."""
    rows = [r for r, _ in fitting_rows(dataset, model, n, max_tokens)]
    out.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "prompt_id": r["prompt_id"], "max_chars": MAX_CHARS}) + "\n"
            for r in rows
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", help="policy folder, .gguf file or 'smollm2' (default: a random tiny llama, BPE tokenizer)"
    )
    ap.add_argument(
        "--dataset",
        default=default_dataset(),
        help="prompt file, or 'demo' for the a+b= task (default: real Alpaca prompts if present)",
    )
    ap.add_argument("--optimizer", default="rloo", choices=["rloo", "grpo"], help="the same algorithm on both sides")
    ap.add_argument(
        "--use_lora", action="store_true", help="train LoRA adapters on both sides (r 16, alpha 32, all linear)"
    )
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl", type=float, default=None, help="KL coefficient (default: 0.05 for grpo, 0 for rloo)")
    ap.add_argument(
        "--micro_batch",
        type=int,
        default=16,
        help="rows per forward/backward pass on every side (ours: --forward_batch_size; TRL: per-device batch"
        " with gradient accumulation up to prompts x k; the bare loop: the same accumulation)",
    )
    ap.add_argument(
        "--engine_threads", type=int, default=2, help="our engine's decode threads (`align rlhf --threads`)"
    )
    ap.add_argument(
        "--trl_generation",
        default="auto",
        choices=["auto", "vllm", "transformers"],
        help="TRL's generation: auto tries colocated vLLM, then transformers",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rlhf.json"))
    ap.add_argument("--worker", choices=["bare"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(bare_loop(json.loads(a.spec))))
        return
    if a.kl is None:
        a.kl = 0.05 if a.optimizer == "grpo" else 0.0
    if (a.prompts * a.k) % a.micro_batch:
        raise SystemExit(f"--micro_batch {a.micro_batch} must divide prompts x k = {a.prompts * a.k}")

    import torch

    from align.tasks.demo import write_demo_data
    from align.tasks.tiny import make_tiny_model

    peak = matmul_peak_gflops(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = resolve_model(a.model) if a.model else str(make_tiny_model(tmp / "tiny", tokenizer="bpe"))
        if a.dataset == "demo":  # rewarded by the arithmetic rule
            a.reward, prompts = "arithmetic", write_demo_data(tmp / "demo")["prompts"]
        else:  # instructions, rewarded by a length budget (no reference answers needed)
            a.reward, prompts = (
                "length_penalty",
                write_prompts(a.dataset, a.prompts, model, a.max_tokens, tmp / "prompts.jsonl"),
            )
        params = parameter_count(model)
        ours = run_ours(model, prompts, a, tmp)
        bare = run_bare(model, prompts, a, ours["response_lengths"])
        bare_kept = run_bare(model, prompts, a, ours["response_lengths"], HEAP_KEPT_ENV)
        trl_vllm = (
            run_trl(model, prompts, a, True, tmp)
            if a.trl_generation in ("auto", "vllm")
            else {"ok": False, "error": "not tried"}
        )
        trl = trl_vllm if trl_vllm["ok"] or a.trl_generation == "vllm" else run_trl(model, prompts, a, False, tmp)

    trainer = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}[a.optimizer]
    baseline = f"TRL {trainer} + " + ("colocated vLLM" if trl_vllm["ok"] else "transformers generate")
    ours_train, bare_train = (
        statistics.median(ours["train_seconds_per_iteration"]),
        statistics.median(bare["train_seconds_per_iteration"]),
    )
    kept_train = statistics.median(bare_kept["train_seconds_per_iteration"])
    tokens = statistics.median(bare["trained_tokens_per_iteration"])
    result = {
        "machine": platform.platform(),
        **cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(peak, 1),
        "model": a.model or "tiny random llama",
        "parameters": params,
        "settings": vars(a),
        "ours": ours,
        "bare_loop": bare,
        "bare_loop_heap_kept": bare_kept,
        "trl": trl,
        "trl_baseline": baseline,
        "trl_colocated_vllm_error": None if trl_vllm["ok"] else trl_vllm["error"],
        "speedup_samples_per_s": ours["samples_per_s"] / trl["samples_per_s"] if trl["ok"] else None,
        "train_over_bare_loop": ours_train / bare_train,
        "train_over_bare_loop_heap_kept": ours_train / kept_train,
        "train_peak_fraction": {
            "ours": peak_fraction(tokens / ours_train, 6 * params, peak),
            "bare_loop": peak_fraction(tokens / bare_train, 6 * params, peak),
            "bare_loop_heap_kept": peak_fraction(tokens / kept_train, 6 * params, peak),
        },
        "peak_rss_over_trl": ours["peak_rss_mb"] / trl["peak_rss_mb"] if trl["ok"] else None,
    }
    lora = " --use_lora" if a.use_lora else ""
    print(
        f"{a.prompts} prompts x K={a.k} x {a.max_tokens} tokens, {a.iterations} iterations, {a.optimizer}{lora}, "
        f"{result['model']} ({params / 1e6:.1f}M parameters)"
    )
    print(f"{result['cpu']}; {torch.get_num_threads()} torch threads; matmul peak {peak:.0f} GFLOP/s")
    print(f"{'path':48s}{'samples/s':>10s}{'ratio':>8s}{'peak RSS MB':>13s}")
    print(
        f"{'align rlhf (in-process vLLM)':48s}{ours['samples_per_s']:10.2f}{result['speedup_samples_per_s'] or float('nan'):7.2f}x"
        f"{ours['peak_rss_mb']:13,d}"
    )
    if trl["ok"]:
        print(f"{baseline:48s}{trl['samples_per_s']:10.2f}{1.0:7.2f}x{trl['peak_rss_mb']:13,d}")
    else:
        print(f"{baseline:48s} failed: {trl['error']}")
    if not trl_vllm["ok"]:
        print(f"TRL colocated vLLM: {trl_vllm['error']}")
    print(f"weight sync share of our iteration time: {ours['sync_fraction']:.1%} (goal <= 5%)")
    print(
        f"training phase, median per iteration: ours {ours_train:.2f} s, bare torch loop {bare_train:.2f} s: "
        f"{result['train_over_bare_loop']:.2f}x (goal <= 1.3x); {tokens} tokens per iteration = "
        f"{result['train_peak_fraction']['ours']:.1%} / {result['train_peak_fraction']['bare_loop']:.1%} of the matmul peak"
    )
    print(
        f"  against the bare loop keeping freed memory as we do ({' '.join(f'{k}={v}' for k, v in HEAP_KEPT_ENV.items())}): "
        f"{kept_train:.2f} s, {result['train_over_bare_loop_heap_kept']:.2f}x, "
        f"{result['train_peak_fraction']['bare_loop_heap_kept']:.1%} of the peak"
    )
    if result["peak_rss_over_trl"]:
        print(f"peak RSS ours / TRL: {result['peak_rss_over_trl']:.2f}x (goal <= 1.0x)")
    write_result(a.out, result)


if __name__ == "__main__":
    main()
