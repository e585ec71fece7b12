"""Training options shared by the trainer-based stages (sft, rm, dpo, distill), their mapping to TRL,
the resume-train-stop sequence every one of them runs (``resume_checkpoint``, ``train_to_end``) and
the end they share once the model is saved (``finish_training``: the loss plot, then stage.json).

TRL's configs default to ``bf16=True`` and ``gradient_checkpointing=True``, which are wrong on a
CPU and for tiny models; we set every such default explicitly from our own typed fields (an unset
``bf16`` by the device: ``resolve_mixed_precision``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

from align.core.config import option
from align.core.stage_dir import Stage

REPORT_TO_HELP = (
    "Experiment trackers that also get every logged row (transformers' integrations: tensorboard, wandb,"
    " trackio, mlflow, ...; empty: none). metrics.jsonl is always written; TensorBoard logs go to"
    " output_dir/tensorboard."
)


@dataclasses.dataclass
class TrainOptions:
    learning_rate: float = option(2e-5, "Peak learning rate (AdamW).")
    num_train_epochs: float = option(1.0, "Epochs over the dataset (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Total optimizer steps; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = option(8, "Examples per device per micro-batch.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", "Learning-rate schedule."
    )
    warmup_ratio: float = option(0.0, "Fraction of steps spent warming up the learning rate.")
    weight_decay: float = option(0.0, "Decoupled weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    max_length: int = option(1024, "Longest tokenized example; longer ones are truncated.")
    logging_steps: int = option(10, "Log metrics every N steps (to metrics.jsonl and the progress bar).")
    save_steps: int = option(500, "Write a resumable checkpoint every N steps.")
    save_total_limit: int = option(2, "Keep at most N checkpoints.")
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory (slower).")
    bf16: bool | None = option(
        None,
        "bfloat16 mixed precision: autocast over fp32 weights (a full fine-tune loads fp32 master weights"
        " whatever dtype says; LoRA keeps its frozen base in dtype). Unset: on with a CUDA GPU that has"
        " bf16 (Ampere or newer), fp16 mixed precision on an older CUDA GPU, off on CPU (slow on most"
        " CPUs). false: full precision everywhere.",
    )
    report_to: list[str] = option([], REPORT_TO_HELP)

    def mixed_precision(self) -> dict[str, bool]:
        """TRL's ``bf16`` and ``fp16`` for this run (``resolve_mixed_precision`` on its device)."""
        return resolve_mixed_precision(self.bf16, self.resolved_device())  # type: ignore[attr-defined]

    def recorded(self, name: str, value: Any) -> Any:
        """An unset ``bf16`` on CPU is off, as ``bf16: false`` (the default before it could be
        unset): the same identity, so a CPU stage finished with it still matches."""
        if name == "bf16" and value is None and self.resolved_device() == "cpu":  # type: ignore[attr-defined]
            value = False
        return super().recorded(name, value)  # type: ignore[misc]

    def validate_training(self) -> None:
        from align.core.errors import ConfigError

        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "max_length",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"'learning_rate' must be positive, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"'max_steps' must be positive or -1 (use epochs), got {self.max_steps}")
        if self.report_to:
            from align.training.tracking import check_trackers

            check_trackers(self.report_to)


def resolve_mixed_precision(bf16: bool | None, device: str) -> dict[str, bool]:
    """TRL's ``bf16`` and ``fp16`` for a trainer on ``device``: ``bf16`` as set, without fp16 (an
    explicit value wins); unset, bf16 on a CUDA GPU that has it (Ampere or newer:
    ``cuda_has_bf16``), fp16 autocast on an older CUDA GPU, neither on CPU."""
    if bf16 is not None:
        return {"bf16": bf16, "fp16": False}
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    from align.training.models import cuda_has_bf16

    has_bf16 = cuda_has_bf16()
    return {"bf16": has_bf16, "fp16": not has_bf16}


def trl_args(cfg: Any, stage: Stage) -> dict[str, Any]:
    """Keyword arguments common to TRL's SFTConfig / DPOConfig / RewardConfig."""
    from align.training.tracking import report_to

    return {
        "output_dir": str(stage.checkpoints_dir),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        **cfg.mixed_precision(),  # bf16 and fp16
        "use_cpu": cfg.resolved_device() == "cpu",
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "report_to": report_to(cfg.report_to),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "save_only_model": False,  # optimizer, scheduler and RNG state are what make --resume exact
    }


def checkpoint_step(checkpoint: Path | None) -> int:
    """The global step of a ``checkpoint-N`` folder (0 for none)."""
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def resume_checkpoint(cfg: Any, stage: Stage) -> Path | None:
    """The checkpoint ``--resume`` continues from (None for a fresh run); the metrics logged after
    it are dropped, since the resumed run logs those steps again."""
    checkpoint = stage.latest_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        stage.truncate_metrics(after_step=checkpoint_step(checkpoint))
    return checkpoint


def _trainer_state(checkpoint: Path | None) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (whole: ``align.core.stage_dir.checkpoint_problem`` checked it)."""
    return json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}


def _restore_token_count(trainer, state: dict[str, Any]) -> None:
    """TRL's SFTTrainer logs ``num_tokens``, the tokens trained on so far, from a counter its
    checkpoints do not hold: on resume, start it from the row logged at the checkpoint's step (there
    when save_steps is a multiple of logging_steps; otherwise the resumed rows count from there)."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    rows = [r for r in state.get("log_history", []) if r.get("step") == state.get("global_step") and "num_tokens" in r]
    if rows:
        trainer._total_train_tokens = rows[-1]["num_tokens"]


def _resume_past_the_end(trainer, checkpoint: Path) -> None:
    """The checkpoint holds every step (the run was stopped between its last checkpoint and its
    model): load it instead of ``train()``, which would run one step more when max_steps ends
    inside an epoch (transformers checks for the end after each step, not before the first)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def train_to_end(trainer, stage: Stage, checkpoint: Path | None) -> dict[str, Any] | None:
    """Run a transformers/TRL ``trainer`` to its end the way every trainer stage does.

    Quiet console (our progress bar instead of tqdm), TensorBoard logs under the stage, resume
    from ``checkpoint``, a clean exit after the checkpoint a preemption signal asked for, then a
    barrier. Returns the summary fields all trainer stages share on the main process, None on the
    others (only the main process saves, evaluates, plots and writes stage.json).
    """
    from align.training.fused_head import tune_fused_lm_head_for_cpu
    from align.training.lora_dropout import use_fast_lora_dropout
    from align.training.tracking import last_value, quiet_trainer, route_tensorboard, stop_if_preempted

    use_fast_lora_dropout(
        trainer.model
    )  # peft's LoRA dropout draws its CPU masks slowly (align/training/lora_dropout.py)
    tune_fused_lm_head_for_cpu()  # TRL's fused LM head scores prompt and padding too on CPU (align/training/fused_head.py)
    quiet_trainer(trainer)
    route_tensorboard(trainer.callback_handler.callbacks, stage)
    started, cpu_started = time.time(), time.process_time()
    state = _trainer_state(checkpoint)
    _restore_token_count(trainer, state)
    if checkpoint is not None and state["global_step"] >= state["max_steps"]:
        _resume_past_the_end(trainer, checkpoint)
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    stop_if_preempted(trainer, stage)
    seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    return {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss if result is not None else None,  # the mean over this call's steps
        "final_loss": last_value(stage.metrics(), "loss"),
        "resumed_from_step": checkpoint_step(checkpoint),
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # this process, all threads
        "num_processes": trainer.accelerator.num_processes,
    }


def finish_training(
    stage: Stage, cfg: Any, summary: dict[str, Any], artifacts: dict[str, str], plotted: list[str]
) -> dict[str, Any]:
    """The end of a trainer stage on the main process, after ``save_model`` and its evaluations:
    ``loss.png`` (the metrics ``plotted`` against step; among the artifacts when drawn), then
    stage.json (``Stage.finish``), the checkpoints dropped unless ``keep_checkpoints``."""
    from align.training.tracking import plot_metrics

    plot = plot_metrics(stage.metrics(), plotted, stage.dir / "loss.png", f"{stage.name}: {cfg.output_dir}")
    if plot:
        artifacts["plot"] = str(plot)
    return stage.finish(summary, artifacts, keep_checkpoints=cfg.keep_checkpoints)
