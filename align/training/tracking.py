"""Progress and metrics for trainer-based stages: a rich progress bar with ETA, metrics.jsonl, a PNG.

Replaces the transformers tqdm bar (``disable_tqdm=True``) with one rich bar per stage, and
appends every ``on_log`` row to the stage's ``metrics.jsonl`` as it happens. It is also the
trainer stages' preemption safe point (``align.core.preempt``): after a stop signal, the next step end
writes a checkpoint and ends training.

Experiment trackers (``--report_to tensorboard,wandb,...``) are transformers' integration
callbacks, fed the same rows: by the Trainer in sft, rm and dpo, by ``Trackers`` in the rlhf loop.
``metrics.jsonl`` stays the record (resume truncates it; trackers keep what they were sent).
TensorBoard writes to ``DIR/tensorboard``, not under the checkpoints, which are removed on success.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.core import preempt
from align.core.errors import ConfigError, did_you_mean
from align.core.stage_dir import TENSORBOARD_DIR, Stage

# Trackers transformers cannot tell are installed (no is_*_available among its reporting checks).
_UNDETECTED = ("flyte", "kubeflow")


def check_trackers(names: list[str]) -> None:
    """ConfigError unless every name is one of transformers' reporting integrations and installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    valid = sorted(INTEGRATION_TO_CALLBACK)
    installed = set(get_available_reporting_integrations()) | set(_UNDETECTED)
    for name in names:
        if name == "none" and len(names) == 1:
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            hint = did_you_mean(name, valid)
            raise ConfigError(f"unknown tracker '{name}' in 'report_to'{hint}; valid: {', '.join(valid)} (or none)")
        if name not in installed:
            raise ConfigError(
                f"'report_to' {name}: its package is not installed (pip install {name}), or drop it from report_to"
            )


def report_to(names: list[str]) -> list[str]:
    """Our ``report_to`` list as transformers' TrainingArguments take it (``[]`` or ``["none"]``: none)."""
    return [n for n in names if n != "none"]


def route_tensorboard(callbacks: list, stage: Stage) -> None:
    """Point transformers' TensorBoard callback(s) at ``DIR/tensorboard`` (its default is under
    TrainingArguments.output_dir, our checkpoints folder)."""
    from transformers.integrations import TensorBoardCallback

    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(stage.dir / TENSORBOARD_DIR)


class Trackers:
    """transformers' tracker callbacks for a loop without a Trainer (``align rlhf``).

    ``log(row)`` sends one metrics row, as the Trainer's ``on_log`` would: the ``step`` key is the
    global step, every other value is logged. Only the main process reports.
    """

    def __init__(self, names: list[str], stage: Stage, use_cpu: bool, model=None):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        names = report_to(names) if stage.is_main else []
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(names)]
        if not self.callbacks:
            return
        route_tensorboard(self.callbacks, stage)
        self.args = TrainingArguments(
            output_dir=str(stage.checkpoints_dir), report_to=names, use_cpu=use_cpu, run_name=stage.dir.name
        )
        self.state, self.control = TrainerState(), TrainerControl()
        for callback in self.callbacks:
            callback.on_train_begin(self.args, self.state, self.control, model=model)

    def log(self, row: dict[str, Any]) -> None:
        if not self.callbacks:
            return
        self.state.global_step = row["step"]
        logs = {k: v for k, v in row.items() if k != "step"}
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=logs)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.on_train_end(self.args, self.state, self.control)
        self.callbacks = []


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
        self.stage.record_inputs()
        self.progress, self.task = progress_bar(self.description, state.max_steps, state.global_step)
        self.progress.start()

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


def progress_bar(description: str, total: int, completed: int, show: bool = True):
    """A rich progress bar (bold description, bar, done/total, a ``status`` field, time, ETA) with its
    one task, not yet started: ``(progress, task)``. Drawn only when ``show`` and stderr is a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not (show and sys.stderr.isatty()),
    )
    return progress, progress.add_task(description, total=total, completed=completed, status="")


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
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    return plot_series(series, path, title)


def plot_series(
    series: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str = "step"
) -> Path | None:
    """Plot (x, y) points, one panel per series, into a PNG in a child process (``plot_metrics``);
    None if there is nothing to plot or drawing failed."""
    import json
    import subprocess

    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    job = json.dumps({"series": series, "path": str(path), "title": title, "x_label": x_label})
    proc = subprocess.run([sys.executable, "-m", "align.training.plot"], input=job, text=True, capture_output=True)
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

    from align.core.stage_dir import atomic_write_text
    from align.training.evaluation import evaluate
    from sampling.hf import TransformersEngine

    report = evaluate(TransformersEngine(model, tokenizer), cfg.eval_dataset, cfg.eval_reward, cfg.eval_max_tokens)
    atomic_write_text(stage.dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in report["results"]))
    return {"eval_mean_reward": report["mean_reward"], "eval_prompts": report["num_prompts"]}
