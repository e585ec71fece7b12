"""Progress and metrics for trainer-based stages: a rich progress bar with ETA, metrics.jsonl, a PNG.

Replaces the transformers tqdm bar (``disable_tqdm=True``) with one rich bar per stage, and
appends every ``on_log`` row to the stage's ``metrics.jsonl`` as it happens. It is also the
trainer stages' preemption safe point (``align.preempt``): after a stop signal, the next step end
writes a checkpoint and ends training.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align import preempt
from align.stage import Stage


class StageCallback(TrainerCallback):
    """Log rows to ``metrics.jsonl``, drive a rich progress bar (ETA included), and checkpoint and
    stop at the step end after a stop signal (``stopped_at`` is then that step)."""

    def __init__(self, stage: Stage, description: str):
        self.stage = stage
        self.description = description
        self.progress = None
        self.task = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
            disable=not sys.stderr.isatty(),
        )
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        if state.global_step < state.max_steps and preempt.agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: _plain(v) for k, v in logs.items()})
        self.stage.log(row)
        if self.progress is not None and "loss" in logs:
            self.progress.update(self.task, status=f"loss {logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def stop_if_preempted(trainer, stage: Stage) -> None:
    """After ``trainer.train()``: raise ``Interrupted`` if a stop signal ended training early
    (the checkpoint of that step is on disk); return if training ran to its end."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, StageCallback) and cb.stopped_at is not None:
            kept = f"checkpoint {stage.checkpoints_dir / f'checkpoint-{cb.stopped_at}'} written"
            raise preempt.stopped(f"at step {cb.stopped_at}/{trainer.state.max_steps}", kept)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def plot_metrics(rows: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> Path | None:
    """Plot ``keys`` against step from metrics rows into a PNG; None if there is nothing to plot
    (or drawing failed: a warning, the stage still finishes).

    Drawn in a child process: matplotlib adds ~25 MB to whatever process imports it, which would
    count against the trainer's own peak memory (bench/bench_dpo.py compares that with TRL's).
    """
    import json
    import subprocess

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    job = json.dumps({"series": series, "path": str(path), "title": title})
    proc = subprocess.run([sys.executable, "-m", "align.plot"], input=job, text=True, capture_output=True)
    if proc.returncode != 0:  # a plot is a convenience: warn, never fail a finished stage
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"warning: could not draw {path}: {last}", file=sys.stderr)
        return None
    return path


def quiet_trainer(trainer) -> None:
    """Our StageCallback logs and shows progress; drop transformers' printer of raw log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    hf_logging.disable_progress_bar()


def last_value(rows: list[dict[str, Any]], key: str) -> Any:
    """The last logged value of ``key`` in metrics rows, or None."""
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def evaluate_trained(model, tokenizer, cfg: Any, stage: Stage) -> dict[str, Any]:
    """Greedy answers of a just-trained model on ``cfg.eval_dataset`` (transformers engine, no
    reload), per-prompt rows to DIR/eval.jsonl; returns the summary fields."""
    import json

    from align.evaluation import evaluate
    from align.stage import atomic_write_text
    from sampling.hf import TransformersEngine

    report = evaluate(TransformersEngine(model, tokenizer), cfg.eval_dataset, cfg.eval_reward, cfg.eval_max_tokens)
    atomic_write_text(stage.dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in report["results"]))
    return {"eval_mean_reward": report["mean_reward"], "eval_prompts": report["num_prompts"]}
