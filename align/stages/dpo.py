"""``align dpo``: offline preference optimization with TRL's DPOTrainer and Llama 3's refinements.

    align dpo --config configs/demo_dpo.yaml --model_name_or_path runs/sft/model \\
        --dataset runs/demo/pairs.jsonl --eval_dataset runs/demo/test.jsonl --output_dir runs/dpo
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m align dpo ...   # 2 processes

TRL's DPOTrainer computes the losses and runs the loop; ``align.training.dpo_trainer`` extends it with a
collator and a small subclass. What this stage adds, and where it departs from the papers:
1. Losses by name from ``DPO_LOSSES`` (``--loss sigmoid,nll:0.2``), mapped to TRL's ``loss_type`` and
   ``loss_weights`` lists and summed. The default is Llama 3's: DPO plus 0.2 x the chosen
   response's NLL. TRL 1.16's ``sigmoid`` loss has no label smoothing, so the label-noise option
   is ``robust`` (Chowdhury et al. 2024), the unbiased form of cDPO's smoothing.
2. Llama 3's formatting-token masking, on by default (see ``align.training.dpo_trainer``).
3. The reference: ``--ref_model``, else the starting policy (with ``use_lora``: the base with the
   adapter disabled); its log-probs are precomputed once and cached on disk by default, so a
   rerun, a resumed run or a second epoch never recomputes them.
4. Pair filtering before training, each step counted in stage.json: Llama 3's preference-strength
   filter (``keep_preferences``), pairs whose chosen equals rejected, repeated pairs, and
   near-identical pairs (``near_identical_ratio``); over-long prompts truncated or skipped.
5. The stage contract (``align.core.stage_dir``), ``--resume``, an optional greedy evaluation like
   ``align sft``'s, and multi-process runs under ``accelerate launch`` (only the main process
   writes stage.json, metrics and the model).
6. ``--optimizer_merge ondare|onties``: Qwen2's Online Merging Optimizer in place of AdamW
   (``align.rl.merging_optimizer``), with the task vector taken against ``--merge_base``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from typing import Any, Literal

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, DataError
from align.core.fingerprint import cache_dir
from align.core.registry import Registry, command
from align.core.stage_dir import CheckpointOptions, Stage, read_stage
from align.rl.merging_optimizer import OnlineMergingOptions
from align.training.evaluation import EvalOptions
from align.training.models import ModelOptions, load_causal_lm, load_tokenizer, peft_config, save_model
from align.training.trainer import TrainOptions, finish_training, resume_checkpoint, train_to_end, trl_args

# ---------------------------------------------------------------------------------------------
# Losses: our names -> TRL loss types with default weights
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss:
    trl_type: str  # the TRL DPOConfig.loss_type entry that computes it
    weight: float  # default weight in the sum
    preference: bool  # compares chosen with rejected (False: a regularizer)
    source: str


DPO_LOSSES: Registry[Loss] = Registry("loss")
DPO_LOSSES.register(
    "sigmoid", Loss("sigmoid", 1.0, True, "DPO, Rafailov et al. 2023 eq. 7: -log sigmoid(beta * margin)")
)
DPO_LOSSES.register("ipo", Loss("ipo", 1.0, True, "IPO, Azar et al. 2023 eq. 17: (margin / tokens - 1 / (2 beta))^2"))
DPO_LOSSES.register(
    "robust", Loss("robust", 1.0, True, "robust DPO, Chowdhury et al. 2024: label noise label_smoothing")
)
DPO_LOSSES.register(
    "hinge",
    Loss(
        "hinge",
        1.0,
        True,
        "RSO, Liu et al. 2023: SLiC's hinge on the normalized likelihood, max(0, 1 - beta * margin)",
    ),
)
DPO_LOSSES.register(
    "nll", Loss("sft", 0.2, False, "Llama 3: NLL of the chosen responses (mean over their tokens), weight 0.2")
)


def resolve_losses(specs: list[str]) -> tuple[list[str], list[float]]:
    """``["sigmoid", "nll:0.2"]`` -> TRL ``(loss_type, loss_weights)``; ConfigError lists valid names."""
    types, weights, names = [], [], []
    for spec in specs:
        name, _, weight = spec.partition(":")
        name = name.strip()
        loss = DPO_LOSSES[name]  # an unknown name is a ConfigError listing the valid ones
        if name in names:
            raise ConfigError(f"loss '{name}' is listed twice in 'loss'")
        try:
            value = float(weight) if weight else loss.weight
        except ValueError:
            raise ConfigError(f"loss '{spec}': the weight after ':' must be a number (e.g. nll:0.2)") from None
        names.append(name)
        types.append(loss.trl_type)
        weights.append(value)
    if not any(DPO_LOSSES[n].preference for n in names):
        raise ConfigError(
            f"'loss' needs a preference loss ({', '.join(n for n, loss in DPO_LOSSES.items() if loss.preference)});"
            " 'nll' alone is SFT (use align sft)"
        )
    return types, weights


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DPOConfig(TrainOptions, ModelOptions, EvalOptions, OnlineMergingOptions, CheckpointOptions, BaseConfig):
    run_control = ("overwrite", "resume", "ref_cache_dir")
    output_dirs = ("output_dir", "ref_cache_dir")
    inputs = ("model_name_or_path", "ref_model", "dataset", "eval_dataset", "eval_reward")

    dataset: str = required(
        "Preference pairs: JSONL/JSON/Parquet, a `datasets` folder or a Hub id (TRL prompt/chosen/rejected, implicit-prompt, Alpaca or ShareGPT)."
    )
    output_dir: str = required("Stage directory: stage.json, metrics.jsonl, model/ and checkpoints/ go here.")
    loss: list[str] = option(
        ["sigmoid", "nll"],
        "Losses summed, as NAME or NAME:WEIGHT: "
        + "; ".join(f"{n} ({loss.source})" for n, loss in DPO_LOSSES.items())
        + ". Default: Llama 3's DPO + 0.2 NLL.",
        names=DPO_LOSSES,
    )
    beta: float = option(0.1, "DPO beta: strength of the pull toward the reference (Llama 3: 0.1).")
    label_smoothing: float = option(
        0.0, "Probability that a preference label is flipped, in [0, 0.5); used by the robust loss only."
    )
    ref_model: str | None = option(
        None,
        "Reference model folder or Hub id; default: the starting policy (with use_lora: its base, adapter disabled).",
    )
    group_by_length: bool = option(
        False,
        "Batch pairs of similar length (transformers' LengthGroupedSampler: random mega-batches, sorted inside), so batches pad far less on data of varied lengths; TRL's DPOTrainer cannot (its pairs have no input_ids).",
    )
    precompute_ref_log_probs: bool = option(
        True,
        "Compute the reference log-probs once before training and cache them on disk (no reference model in memory while training).",
    )
    ref_cache_dir: str | None = option(
        None,
        "Where cached reference log-probs live; default $XDG_CACHE_HOME/align/ref_logps (~/.cache/align/ref_logps). Keyed by reference model, tokenized pairs and settings.",
    )
    mask_formatting_tokens: bool = option(
        True,
        "Llama 3: leave the chat format's header and termination special tokens out of the log-probs of chosen and rejected.",
    )
    formatting_tokens: list[str] = option(
        [], "Tokens to mask; empty: the special tokens that the tokenizer's chat template writes."
    )
    max_prompt_length: int | None = option(
        None, "Longest prompt in tokens (default max_length - 1); longer prompts follow long_prompts."
    )
    long_prompts: Literal["skip", "truncate"] = option(
        "skip",
        "Over-long prompts: skip the pair, or keep the prompt's last max_prompt_length tokens. Counted in stage.json.",
    )
    preference_column: str = option(
        "preference",
        "Column holding a pair's preference strength (Llama 3: significantly better / better / slightly better / negligibly better).",
    )
    keep_preferences: list[str] = option(
        [],
        "Keep only pairs whose preference_column value is one of these (Llama 3 keeps 'significantly better,better'); empty keeps all.",
    )
    drop_duplicates: bool = option(True, "Drop repeated (prompt, chosen, rejected) pairs after the first.")
    near_identical_ratio: float | None = option(
        None,
        "Drop pairs whose chosen and rejected texts are at least this similar (difflib ratio in (0, 1], e.g. 0.95); null keeps them.",
    )
    seed: int = option(0, "Random seed (data order, dropout).")

    def validate(self) -> None:
        self.validate_training()
        resolve_losses(self.loss)
        if self.beta <= 0:
            raise ConfigError(f"'beta' must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"'label_smoothing' must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and "robust" not in [s.partition(":")[0].strip() for s in self.loss]:
            raise ConfigError("'label_smoothing' only applies to the robust loss; add robust to 'loss' or set it to 0")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"'max_prompt_length' must be in [1, max_length={self.max_length}), got {self.max_prompt_length}"
                " (the response needs room)"
            )
        if self.near_identical_ratio is not None and not 0.0 < self.near_identical_ratio <= 1.0:
            raise ConfigError(f"'near_identical_ratio' must be in (0, 1], got {self.near_identical_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.merge_lora and not (self.use_lora or self.load_in_4bit):
            raise ConfigError("'merge_lora' needs use_lora (or load_in_4bit); a full fine-tune is already merged")
        self.validate_merging(lora=self.use_lora or self.load_in_4bit)


# ---------------------------------------------------------------------------------------------
# Pair filtering (pure: rows in, rows and counts out)
# ---------------------------------------------------------------------------------------------


def _text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def filter_pairs(rows: list[dict], cfg: DPOConfig, source: str) -> tuple[list[dict], dict[str, int]]:
    """Apply the preference filter, then drop identical, repeated and near-identical pairs."""
    report = {
        "pairs_in": len(rows),
        "filtered_by_preference": 0,
        "identical_skipped": 0,
        "duplicates_dropped": 0,
        "near_identical_dropped": 0,
    }
    keep, seen = [], set()
    for i, row in enumerate(rows, start=1):
        if cfg.keep_preferences:
            if row.get(cfg.preference_column) is None:
                raise DataError(
                    f"{source} row {i}: no '{cfg.preference_column}' column, which keep_preferences filters on;"
                    " add it to every row or set preference_column"
                )
            if str(row[cfg.preference_column]) not in cfg.keep_preferences:
                report["filtered_by_preference"] += 1
                continue
        if row["chosen"] == row["rejected"]:
            report["identical_skipped"] += 1
            continue
        key = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True)
        if cfg.drop_duplicates and key in seen:
            report["duplicates_dropped"] += 1
            continue
        seen.add(key)
        if cfg.near_identical_ratio is not None:
            ratio = difflib.SequenceMatcher(None, _text(row["chosen"]), _text(row["rejected"])).ratio()
            if ratio >= cfg.near_identical_ratio:
                report["near_identical_dropped"] += 1
                continue
        keep.append(row)
    if not keep:
        raise DataError(
            f"{source}: no preference pairs left after filtering ({_counts(report)}); check the data"
            " and the filter options"
        )
    return keep, report


def _counts(report: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in report.items())


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@command(
    "dpo",
    DPOConfig,
    "Offline preference optimization (TRL DPOTrainer) with Llama 3's masking and NLL term.",
    order=23,
    artifacts=("model",),
    metrics={"held_out": "eval_mean_reward"},
)
def run_dpo(cfg: DPOConfig) -> dict:
    """Run the DPO stage; returns the stage record (also written to output_dir/stage.json)."""
    stage = Stage("dpo", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite, resume=cfg.resume):
        return read_stage(cfg.output_dir)
    # the trainer stack (seconds to import) only for a run that trains
    import datasets

    from align.training.data import load_rows
    from align.training.tracking import StageCallback, last_value

    datasets.disable_progress_bars()
    rows, report = filter_pairs(load_rows(cfg.dataset, "preference"), cfg, cfg.dataset)
    train = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    del rows  # the Arrow table holds the pairs from here on; the Python copy would only add to peak memory
    checkpoint = resume_checkpoint(cfg, stage)
    started = time.time()
    trainer = build_trainer(cfg, train, stage, callbacks=[StageCallback(stage, "dpo")])
    setup_seconds = time.time() - started
    run = train_to_end(trainer, stage, checkpoint)
    if run is None:  # not the main process
        return {}
    cache = trainer.ref_cache
    tokenizer = trainer.processing_class
    artifacts = save_model(trainer.model, tokenizer, stage.dir, merge_lora=cfg.merge_lora)
    rows_logged = stage.metrics()
    summary: dict[str, Any] = {
        **report,
        **trainer.prompt_report,
        "train_pairs": len(trainer.train_dataset),
        **run,
        "reward_accuracy": last_value(rows_logged, "rewards/accuracies"),
        "reward_margin": last_value(rows_logged, "rewards/margins"),
        "masked_token_ids": list(trainer.data_collator.mask_ids),
        "ref_logps": "live" if cache is None else ("cache_hit" if cache.hit else "computed"),
        "ref_precompute_batches": trainer.ref_forward_batches,  # on this process; 0 on a cache hit
        "ref_cache_file": str(cache.path) if cache else None,
        "setup_seconds": round(setup_seconds, 2),
    }
    if cfg.eval_dataset:
        from align.training.tracking import evaluate_trained

        summary.update(evaluate_trained(trainer.model, tokenizer, cfg, stage))
    return finish_training(stage, cfg, summary, artifacts, ["loss", "rewards/accuracies", "rewards/margins"])


def build_trainer(cfg: DPOConfig, train, stage: Stage, callbacks: list | None = None):
    """The configured ``AlignDPOTrainer`` for ``train`` (prompt/chosen/rejected rows): loads the
    tokenizer, policy and reference, maps our options to TRL's DPOConfig, and (with
    ``precompute_ref_log_probs``) fills the reference log-probs from the cache or computes them."""
    from trl import DPOConfig as TRLDPOConfig

    from align.training.dpo_trainer import (
        LENGTH_COLUMN,
        AlignDPOTrainer,
        MaskingPreferenceCollator,
        RefLogpsCache,
        formatting_token_ids,
    )
    from align.training.fused_head import tune_fused_lm_head_for_cpu

    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg)
    ref_model = load_causal_lm(dataclasses.replace(cfg, model_name_or_path=cfg.ref_model)) if cfg.ref_model else None
    mask_ids = formatting_token_ids(tokenizer, cfg.formatting_tokens) if cfg.mask_formatting_tokens else []
    loss_type, loss_weights = resolve_losses(cfg.loss)
    args = TRLDPOConfig(
        **trl_args(cfg, stage),
        max_length=cfg.max_length,
        beta=cfg.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        ddp_find_unused_parameters=False,
        **(
            {"train_sampling_strategy": "group_by_length", "length_column_name": LENGTH_COLUMN}
            if cfg.group_by_length
            else {}
        ),
    )
    cache = None
    tune_fused_lm_head_for_cpu()  # before the trainer exists: its reference pass runs in __init__
    if cfg.precompute_ref_log_probs:
        cache = RefLogpsCache(cfg.ref_cache_dir or cache_dir("ref_logps"), _reference_identity(cfg, mask_ids))
    return AlignDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        data_collator=MaskingPreferenceCollator(
            pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length, mask_ids=tuple(mask_ids)
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
        callbacks=callbacks,
        max_prompt_length=cfg.max_prompt_length or cfg.max_length - 1,
        long_prompts=cfg.long_prompts,
        ref_cache=cache,
        online_merging=cfg if cfg.optimizer_merge != "none" else None,
    )


def _reference_identity(cfg: DPOConfig, mask_ids: list[int]) -> dict[str, Any]:
    """Everything besides the tokenized pairs that changes the reference log-probs."""
    from importlib.metadata import version

    from align.training.dpo_trainer import model_identity

    precision = cfg.mixed_precision()
    return {
        "reference": model_identity(cfg.ref_model or cfg.model_name_or_path),
        "dtype": cfg.dtype,
        "bf16": precision["bf16"],  # the reference pass runs under the trainer's autocast
        **({"fp16": True} if precision["fp16"] else {}),
        "load_in_4bit": cfg.load_in_4bit and not cfg.ref_model,
        "max_length": cfg.max_length,
        "masked_token_ids": mask_ids,
        "trl": version("trl"),
    }
