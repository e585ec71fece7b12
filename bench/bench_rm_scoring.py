"""Reward-model scoring throughput: length-sorted batches vs naive fixed-order batches.

    .venv/bin/python bench/bench_rm_scoring.py [--model RM_FOLDER] [--texts 512] [--batch_size 32]

Both paths score the same (prompt, response) texts with the same model and batch size through
``reward.model.RewardModel``; only the batching differs. Sorted batching groups sequences of
similar length, so each batch pads to nearly its own length; fixed-order batches pad every
sequence to the longest in a random mix. Responses have lengths spread like sampled outputs
(uniform from a few characters to --max_chars). Without --model a tiny random Llama reward
model (align.tasks.tiny, char tokenizer) is built in a temp dir. Prints a table and writes
bench/results/rm_scoring.json. Wall-clock seq/s is the headline; seq per CPU-second is also
reported because it stays comparable when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from machine import write_result  # bench/, beside this file


def tiny_reward_model(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.tasks.tiny import make_tiny_model

    source = make_tiny_model(folder / "lm", arch="llama", tokenizer="char", seed=0)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder / "rm")
    tok.save_pretrained(folder / "rm")
    return folder / "rm"


def texts(n: int, max_chars: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = "the sum of these two numbers is carried over into the tens place so we write".split()
    prompts, responses = [], []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        prompts.append(f"{a}+{b}=")
        length = rng.randint(4, max_chars)
        text = ""
        while len(text) < length:
            text += rng.choice(words) + " "
        responses.append(f"{text[:length]} {a + b}")
    return prompts, responses


def time_scoring(scorer, prompts, responses, repeats: int) -> tuple[float, float, list[float]]:
    """Best-of-``repeats`` (wall seconds, CPU seconds of this process) and the scores."""
    rows = [{} for _ in prompts]
    scorer.score(prompts[:8], responses[:8], rows[:8])  # warm-up
    wall, cpu, scores = float("inf"), float("inf"), []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        scores = scorer.score(prompts, responses, rows)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, scores


def main() -> None:
    from reward.model import RewardModel, encode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="reward model folder (default: a tiny random Llama RM)")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--max_chars", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared CPU)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rm_scoring.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else tiny_reward_model(Path(tmp))
        prompts, responses = texts(args.texts, args.max_chars, seed=0)
        results = {}
        for label, sort in (("naive fixed-order", False), ("length-sorted", True)):
            scorer = RewardModel.from_pretrained(path, batch_size=args.batch_size, sort_by_length=sort)
            wall, cpu, scores = time_scoring(scorer, prompts, responses, args.repeats)
            results[label] = {
                "seconds": wall,
                "sequences_per_s": len(prompts) / wall,
                "cpu_seconds": cpu,
                "sequences_per_cpu_s": len(prompts) / cpu,
                "scores": scores,
            }
        lengths = [
            len(
                encode(
                    scorer.tokenizer,
                    [{"role": "user", "content": p}],
                    [{"role": "assistant", "content": r}],
                    scorer.max_length,
                )
            )
            for p, r in zip(prompts, responses)
        ]

    naive, ours = results["naive fixed-order"], results["length-sorted"]
    ratio = ours["sequences_per_s"] / naive["sequences_per_s"]
    cpu_ratio = ours["sequences_per_cpu_s"] / naive["sequences_per_cpu_s"]
    max_diff = max(abs(a - b) for a, b in zip(naive["scores"], ours["scores"]))
    print(
        f"reward-model scoring: {args.texts} texts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
        f"batch {args.batch_size}, {args.threads} threads, model {args.model or 'tiny llama RM'}"
    )
    print(f"{'batching':<20}{'wall s':>9}{'seq/s':>9}{'ratio':>7}{'cpu s':>9}{'seq/cpu-s':>11}{'ratio':>7}")
    for label, r in results.items():
        print(
            f"{label:<20}{r['seconds']:>9.3f}{r['sequences_per_s']:>9.1f}{r['sequences_per_s'] / naive['sequences_per_s']:>7.2f}"
            f"{r['cpu_seconds']:>9.3f}{r['sequences_per_cpu_s']:>11.1f}{r['sequences_per_cpu_s'] / naive['sequences_per_cpu_s']:>7.2f}"
        )
    print(f"max |score difference| between the two: {max_diff:.2e}")
    report = {
        "model": args.model or "tiny llama RM (align.tasks.tiny, char tokenizer)",
        "texts": args.texts,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "naive_sequences_per_s": naive["sequences_per_s"],
        "sorted_sequences_per_s": ours["sequences_per_s"],
        "ratio_sorted_over_naive": ratio,
        "naive_sequences_per_cpu_s": naive["sequences_per_cpu_s"],
        "sorted_sequences_per_cpu_s": ours["sequences_per_cpu_s"],
        "cpu_ratio_sorted_over_naive": cpu_ratio,
        "max_score_diff": max_diff,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
