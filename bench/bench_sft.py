"""Benchmark: ``align sft`` against plain TRL ``SFTTrainer`` on the same model and rows.

    .venv/bin/python bench/bench_sft.py                 # tiny BPE model, real Alpaca rows (demo rows if absent)
    .venv/bin/python bench/bench_sft.py --model smollm2 --use_lora --max_rows 64 --batch 8 --max_length 256 --threads 2 --repeats 2

Default rows: the real Alpaca instructions beside the project (../shared/data/real/alpaca_en_demo.json,
read, never copied in), else the demo task's sft.jsonl. ``--model smollm2`` is the real
SmolLM2-135M-Instruct (bench/machine.py); ``--use_lora`` trains LoRA adapters on both sides
(align's defaults: r 16, alpha 32, dropout 0.05, all linear layers; TRL gets the same ``LoraConfig``).

Both sides train one epoch in their own subprocess on the same conversational prompt/completion
rows (what ``align sft`` makes of any accepted format, given to TRL as is) with the loss on the
completion only, the same batch, length, learning rate, schedule and seed:

* ``trl``    TRL's SFTTrainer as its docs show it.
* ``align``  ``align sft`` (TRL's SFTTrainer inside, plus the stage contract: metrics.jsonl,
  progress, resumable checkpoints, the saved model).

Time is the wall and CPU time of ``trainer.train()`` (for align: ``train_seconds`` /
``train_cpu_seconds`` in stage.json), fastest of ``--repeats``; the training losses are printed
side by side to show both did the same work. Peak memory (``ru_maxrss``) comes from one more run
per side with ``MALLOC_MMAP_THRESHOLD_`` set (see bench/bench_dpo.py for why). Goals: align
<= 1.05x TRL's time, peak memory no higher. Prints a table and writes bench/results/bench_sft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import (
    cpu_info,
    print_worker_result,
    resolve_model,
    run_json_worker,
    write_result,
)  # bench/, beside this file

ROOT = Path(__file__).resolve().parents[1]
REAL_ROWS = ROOT.parent / "shared" / "data" / "real" / "alpaca_en_demo.json"
LR, SEED = 1e-4, 0
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # align's defaults (align/training/models.py)


def worker_trl(model: str, rows: str, work: Path, opts: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    data = datasets.Dataset.from_list([json.loads(line) for line in open(rows)])
    args = TRLSFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=opts["batch"],
        num_train_epochs=1,
        learning_rate=LR,
        max_length=opts["max_length"],
        completion_only_loss=True,
        lr_scheduler_type="linear",
        warmup_steps=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = None
    if opts["use_lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA)
    started = time.time()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=peft_config,
    )
    setup = time.time() - started
    started, cpu_started = time.time(), time.process_time()
    out = trainer.train()
    return {
        "train_seconds": time.time() - started,
        "train_cpu_seconds": time.process_time() - cpu_started,
        "setup_seconds": setup,
        "steps": trainer.state.global_step,
        "train_loss": out.training_loss,
    }


def worker_align(model: str, rows: str, work: Path, opts: dict) -> dict:
    from align.core.config import parse_config
    from align.stages.sft import SFTConfig, run_sft

    started = time.time()
    cfg = parse_config(
        SFTConfig,
        [
            "--model_name_or_path",
            model,
            "--dataset",
            rows,
            "--output_dir",
            str(work / "align"),
            "--overwrite",
            "--per_device_train_batch_size",
            str(opts["batch"]),
            "--num_train_epochs",
            "1",
            "--learning_rate",
            str(LR),
            "--max_length",
            str(opts["max_length"]),
            "--seed",
            str(SEED),
            "--save_steps",
            "100000",
            "--logging_steps",
            "10",
            *(
                [
                    "--use_lora",
                    "true",
                    "--lora_r",
                    str(LORA["r"]),
                    "--lora_alpha",
                    str(LORA["lora_alpha"]),
                    "--lora_dropout",
                    str(LORA["lora_dropout"]),
                ]
                if opts["use_lora"]
                else []
            ),
        ],
    )
    s = run_sft(cfg)["summary"]
    return {
        "train_seconds": s["train_seconds"],
        "train_cpu_seconds": s["train_cpu_seconds"],
        "setup_seconds": time.time() - started - s["train_seconds"],
        "steps": s["global_step"],
        "train_loss": s["train_loss"],
    }


WORKERS = {"trl": worker_trl, "align": worker_align}


def prepare_inputs(work: Path, model: str | None, rows: str, max_rows: int | None) -> tuple[str, str]:
    """The model (a folder, ``smollm2``, else a fresh tiny llama) and the rows both sides train on:
    ``rows`` (any format align reads; ``demo``: the demo task's) as conversational prompt/completion
    JSONL, the first ``max_rows`` of them."""
    from align.tasks.demo import write_demo_data
    from align.tasks.tiny import make_tiny_model
    from align.training.data import load_dataset

    model = resolve_model(model) if model else make_tiny_model(work / "tiny", arch="llama", tokenizer="bpe", seed=0)
    if rows == "demo":
        rows = write_demo_data(work / "demo", seed=0)["sft"]
    data = load_dataset(str(rows), "sft").select_columns(["prompt", "completion"])
    if max_rows:
        data = data.select(range(min(max_rows, len(data))))
    out = work / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(model), str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder, .gguf file or 'smollm2' (default: a fresh tiny model)")
    parser.add_argument(
        "--rows",
        default=str(REAL_ROWS) if REAL_ROWS.is_file() else "demo",
        help="SFT rows in any format align reads, or 'demo' (default: the real Alpaca rows when present)",
    )
    parser.add_argument("--max_rows", type=int, help="train on the first N rows only")
    parser.add_argument("--use_lora", action="store_true", help="LoRA adapters on both sides (module docstring)")
    parser.add_argument("--batch", type=int, default=8, help="rows per optimizer step on both sides")
    parser.add_argument("--max_length", type=int, default=512, help="longest tokenized row on both sides")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_sft.json"))
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args.model, args.rows, Path(args.work), json.loads(args.opts))
        print_worker_result(result)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sft."))
    model, rows = prepare_inputs(work, args.model, args.rows, args.max_rows)
    opts = {"batch": args.batch, "max_length": args.max_length, "use_lora": args.use_lora}
    argv = lambda mode: [  # noqa: E731
        "--worker",
        mode,
        "--model",
        model,
        "--rows",
        rows,
        "--work",
        str(work),
        "--opts",
        json.dumps(opts),
    ]
    results: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate the sides, so a busy spell slows both alike
        for mode in WORKERS:
            run = run_json_worker(__file__, argv(mode), args.threads)
            if mode not in results or run["train_seconds"] < results[mode]["train_seconds"]:
                results[mode] = {**run, "all_train_seconds": results.get(mode, {}).get("all_train_seconds", [])}
            results[mode]["all_train_seconds"].append(round(run["train_seconds"], 2))
    for mode in WORKERS:
        results[mode]["peak_rss_mb_default_malloc"] = results[mode].pop("peak_rss_mb")
        results[mode]["peak_rss_mb"] = run_json_worker(__file__, argv(mode), args.threads, memory=True)["peak_rss_mb"]
    base, ours = results["trl"], results["align"]
    ratios = {
        "time": ours["train_seconds"] / base["train_seconds"],
        "cpu_time": ours["train_cpu_seconds"] / base["train_cpu_seconds"],
        "peak_rss": ours["peak_rss_mb"] / base["peak_rss_mb"],
    }
    report = {
        "model": args.model or model,
        "rows": args.rows,
        "max_rows": args.max_rows,
        **opts,
        "threads": args.threads,
        **cpu_info(),
        "load_average": os.getloadavg(),
        "results": results,
        "align_over_trl": ratios,
        "met": {"time": ratios["time"] <= 1.05, "peak_rss": ratios["peak_rss"] <= 1.0},
    }
    print(f"{'side':<8}{'steps':>6}{'epoch s':>9}{'runs':>16}{'cpu s':>8}{'loss':>9}{'peak MB':>9}")
    for mode, r in results.items():
        print(
            f"{mode:<8}{r['steps']:>6}{r['train_seconds']:>9.2f}{str(r['all_train_seconds']):>16}"
            f"{r['train_cpu_seconds']:>8.1f}{r['train_loss']:>9.4f}{r['peak_rss_mb']:>9.0f}"
        )
    print(
        f"align / TRL: time {ratios['time']:.3f}x (goal <= 1.05x), CPU time {ratios['cpu_time']:.3f}x, "
        f"peak memory {ratios['peak_rss']:.3f}x (goal <= 1.0x)"
    )
    write_result(args.out, report)


if __name__ == "__main__":
    main()
