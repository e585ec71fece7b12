"""``align sft``: supervised fine-tuning with TRL's SFTTrainer.

    align sft --config configs/demo_sft.yaml
    align sft --model_name_or_path runs/tiny --dataset runs/demo/sft.jsonl --output_dir runs/sft

TRL's SFTTrainer does the training; we add what a pipeline needs around it:
1. Any accepted data format (TRL, Alpaca, ShareGPT) is normalized to conversational
   prompt/completion, so the loss covers the final assistant turn only (Llama 3: "prompt
   masked"); earlier turns are context.
2. The stage output contract (``align.core.stage_dir``): stage.json, metrics.jsonl, ``model/``, no-op
   reruns, and ``--resume`` from the newest checkpoint after a crash.
3. An optional greedy evaluation on a held-out prompt set scored by ``--eval_reward``.
"""

from __future__ import annotations

import dataclasses

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError
from align.core.registry import command
from align.core.stage_dir import CheckpointOptions, Stage, read_stage
from align.training.data import load_dataset
from align.training.evaluation import EvalOptions
from align.training.models import ModelOptions, load_causal_lm, load_tokenizer, peft_config, save_model
from align.training.trainer import TrainOptions, finish_training, resume_checkpoint, train_to_end, trl_args


@dataclasses.dataclass
class SFTConfig(TrainOptions, ModelOptions, EvalOptions, CheckpointOptions, BaseConfig):
    inputs = ("model_name_or_path", "dataset", "eval_dataset", "eval_reward")
    dataset: str = required(
        "Training data: a JSONL/JSON/Parquet file, a `datasets` folder or a Hub id (TRL, Alpaca or ShareGPT format)."
    )
    output_dir: str = required("Stage directory: stage.json, metrics.jsonl, model/ and checkpoints/ go here.")
    seed: int = option(0, "Random seed (model init of heads, data order, dropout).")

    def validate(self) -> None:
        self.validate_training()
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.merge_lora and not (self.use_lora or self.load_in_4bit):
            raise ConfigError("'merge_lora' needs use_lora (or load_in_4bit); a full fine-tune is already merged")


@command(
    "sft",
    SFTConfig,
    "Supervised fine-tuning (TRL SFTTrainer) on conversational data.",
    order=20,
    artifacts=("model",),
    metrics={"held_out": "eval_mean_reward"},
)
def run_sft(cfg: SFTConfig) -> dict:
    """Run the SFT stage; returns the stage record (also written to output_dir/stage.json)."""
    stage = Stage("sft", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite, resume=cfg.resume):
        return read_stage(cfg.output_dir)
    # TRL and the trainer callbacks import the trainer stack (seconds): only for a run that trains
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from align.training.tracking import StageCallback, evaluate_trained

    train = load_dataset(cfg.dataset, "sft").select_columns(["prompt", "completion"])
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg)
    checkpoint = resume_checkpoint(cfg, stage)

    args = TRLSFTConfig(**trl_args(cfg, stage), max_length=cfg.max_length, completion_only_loss=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
        callbacks=[StageCallback(stage, "sft")],
    )
    run = train_to_end(trainer, stage, checkpoint)
    if run is None:  # not the main process
        return {}
    artifacts = save_model(trainer.model, tokenizer, stage.dir, merge_lora=cfg.merge_lora)
    summary = {"train_rows": len(train), **run}
    if cfg.eval_dataset:
        summary.update(evaluate_trained(trainer.model, tokenizer, cfg, stage))
    return finish_training(stage, cfg, summary, artifacts, ["loss", "learning_rate"])
