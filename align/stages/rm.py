"""``align rm``: train a reward model from preference data (TRL's RewardTrainer, our losses).

    align rm --config configs/demo_rm.yaml --model_name_or_path runs/sft/model \\
      --dataset runs/demo/pairs.jsonl --eval_split 0.1 --output_dir runs/rm
    align rs ... --reward model:runs/rm/model      # the saved model scores text directly

The backbone is any Hugging Face folder ``AutoModelForSequenceClassification`` can load with
one output: a causal LM gets a fresh scalar head read at the last non-padding token (Llama 3
starts its RM from the pre-trained checkpoint), an encoder (e.g. MiniLM) reads its pooled [CLS].

Data: TRL preference rows (any format ``align.training.data`` reads) plus optional columns
  ``edited``            a third, best response (Llama 3): ``--loss ranking`` trains on every ordered
                        pair of edited > chosen > rejected
  ``preference_level``  significantly | better | slightly | negligibly (+ " better"): AFM soft labels
                        (``--loss soft_label``), Llama 2 margins (``--margin level``), and the
                        Llama 3 filter ``--keep_levels significantly,better``
  ``margin``            a number per row (TRL's column), used with ``--margin column``
  ``chosen_reward`` / ``rejected_reward``  the annotating scorer's own scores (``align rs --select
                        bradley_terry`` writes them): the eval split's ``eval_accuracy_noise_free``
                        is the agreement with their ordering, i.e. with the annotator before its noise
  ``chosen_grades`` / ``rejected_grades`` / ``edited_grades``  {head name: level 0..grade_levels-1},
                        AFM's single-sided grades for ``--grade_heads`` (missing grades are skipped)

How this departs from the reports (docs/methods.md):
1. The responses of one prompt are scored as separate sequences (Llama 3 packs them into one row).
2. AFM's grade heads are extra outputs of the same linear head on the last-token embedding
   (output 0 is the reward), so ``model/`` stays a standard sequence-classification folder.
3. Pairwise accuracy and mean margin on the eval split are computed after training with the
   same scorer ``model:`` loads (``reward.model``), so the figure is what scoring will see.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

import torch

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, DataError, ModelError, first_line
from align.core.registry import command
from align.core.stage_dir import CheckpointOptions, Stage, read_stage
from align.training.models import ModelOptions, place_for_trainer, resolve_model_path, save_model, trainable_dtype
from align.training.trainer import TrainOptions, finish_training, resume_checkpoint, train_to_end, trl_args
from reward.losses import (
    IGNORE_GRADE,
    LLAMA2_MARGINS,
    RM_LOSSES,
    SOFT_LABELS,
    RewardBatch,
    get_loss,
    grade_cross_entropy,
    ordered_pairs,
    pairwise_metrics,
    parse_level,
)
from reward.model import REWARD_LABEL, RewardModel, encode
from sampling.logprobs import pad_batch

RESPONSES = ("edited", "chosen", "rejected")  # best first


@dataclasses.dataclass
class RMConfig(TrainOptions, ModelOptions, CheckpointOptions, BaseConfig):
    inputs = ("model_name_or_path", "dataset", "eval_dataset")
    dataset: str = required(
        "Preference data: a JSONL/JSON/Parquet file, a `datasets` folder or a Hub id (TRL, ShareGPT or Alpaca preference format)."
    )
    output_dir: str = required("Stage directory: stage.json, metrics.jsonl, model/ and checkpoints/ go here.")
    loss: str = option("bradley_terry", "Reward loss (reward/losses.py).", choices=RM_LOSSES)
    margin: Literal["none", "column", "level"] = option(
        "none",
        "Bradley-Terry margin m: none (Llama 3), the row's `margin` column (TRL), or Llama 2's margin by preference_level (1, 2/3, 1/3, 0).",
    )
    keep_levels: list[str] = option(
        [], "Train only on rows with these preference levels (Llama 3 kept: significantly,better); empty keeps all."
    )
    grade_heads: list[str] = option(
        [], "AFM single-sided grade heads, by name (e.g. helpfulness,verbosity); read from the *_grades columns."
    )
    grade_levels: int = option(3, "Classes per grade head (AFM: 3).")
    grade_weight: float = option(0.1, "lambda on the grade cross-entropy (AFM does not publish it: our choice).")
    eval_dataset: str | None = option(None, "Held-out preference data for eval_accuracy (else see eval_split).")
    eval_split: float = option(
        0.0, "Fraction of dataset held out (shuffled with seed) for eval_accuracy when no eval_dataset."
    )
    score_batch_size: int = option(32, "Sequences per batch when scoring the eval split (sorted by length).")
    seed: int = option(0, "Random seed (head init, data order, eval split).")

    def validate(self) -> None:
        self.validate_training()
        for level in self.keep_levels:
            parse_level(level, "keep_levels")
        if self.margin != "none" and self.loss != "bradley_terry":
            raise ConfigError(f"'margin' applies to loss bradley_terry only, not {self.loss!r}; set --margin none")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"'eval_split' must be in [0, 1), got {self.eval_split}")
        if self.eval_dataset and self.eval_split:
            raise ConfigError("give either eval_dataset or eval_split, not both")
        if self.grade_heads and self.grade_levels < 2:
            raise ConfigError(f"'grade_levels' must be at least 2, got {self.grade_levels}")
        if self.use_lora or self.load_in_4bit:
            raise ConfigError(
                "align rm trains all weights; LoRA/QLoRA reward models are not supported yet (drop use_lora/load_in_4bit)"
            )


# ---------------------------------------------------------------------------------------------
# Data: preference rows -> tokenized examples (responses best first, soft label, margin, grades)
# ---------------------------------------------------------------------------------------------


def _response(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("content", m.get("value")), str) for m in value
    ):
        return [{"role": "assistant", "content": m.get("content", m.get("value"))} for m in value]
    raise DataError(f"{where}: 'edited' must be a string or assistant message(s), got {type(value).__name__}")


def _grades(row: dict, name: str, heads: list[str], levels: int, where: str) -> list[int]:
    given = row.get(f"{name}_grades") or {}
    if not isinstance(given, dict):
        raise DataError(f"{where}: '{name}_grades' must map grade head names to levels, got {type(given).__name__}")
    unknown = sorted(set(given) - set(heads))
    if unknown:
        raise DataError(
            f"{where}: '{name}_grades' has unknown head {unknown[0]!r}; --grade_heads are: {', '.join(heads)}"
        )
    out = []
    for head in heads:
        value = given.get(head)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < levels):
            raise DataError(f"{where}: '{name}_grades.{head}' must be an integer in 0..{levels - 1}, got {value!r}")
        out.append(IGNORE_GRADE if value is None else value)
    return out


def prepare_examples(rows: list[tuple[int, dict]], spec: str, cfg: RMConfig, tokenizer) -> tuple[list[dict], int]:
    """Tokenize (row number, preference row) pairs; returns (examples, rows dropped by keep_levels).

    An example holds ``chosen_ids``/``rejected_ids`` (so TRL skips its own tokenization),
    ``edited_ids`` (empty without one), ``soft_label``, ``margin`` and ``grade_labels``.
    """
    loss = get_loss(cfg.loss)
    keep = {parse_level(level, "keep_levels") for level in cfg.keep_levels}
    examples, dropped = [], 0
    for n, row in rows:
        where = f"{spec} row {n}"
        level = row.get("preference_level")
        if level is not None:
            level = parse_level(level, where)
        elif loss.needs_level or cfg.margin == "level" or keep:
            why = (
                f"--loss {cfg.loss}"
                if loss.needs_level
                else "--margin level"
                if cfg.margin == "level"
                else "--keep_levels"
            )
            raise DataError(
                f"{where}: {why} needs a 'preference_level' column ({', '.join(SOFT_LABELS)}) in every row"
            )
        if keep and level not in keep:
            dropped += 1
            continue
        if row.get("edited") is not None and not loss.uses_edited:
            raise DataError(
                f"{where}: the row has an 'edited' response, which only --loss ranking trains on; use it or drop the column"
            )
        margin = 0.0
        if cfg.margin == "level":
            margin = LLAMA2_MARGINS[level]
        elif cfg.margin == "column":
            if not isinstance(row.get("margin"), (int, float)):
                raise DataError(f"{where}: --margin column needs a numeric 'margin' column, got {row.get('margin')!r}")
            margin = float(row["margin"])
        responses = {k: _response(row[k], where) for k in RESPONSES if row.get(k) is not None}
        ids = {k: encode(tokenizer, row["prompt"], v, cfg.max_length) for k, v in responses.items()}
        examples.append(
            {
                "chosen_ids": ids["chosen"],
                "rejected_ids": ids["rejected"],
                "edited_ids": ids.get("edited", []),
                "soft_label": SOFT_LABELS[level] if level else 1.0,
                "margin": margin,
                "score_order": score_order(row),
                "grade_labels": [
                    _grades(row, k, cfg.grade_heads, cfg.grade_levels, where) for k in RESPONSES if k in responses
                ],
            }
        )
    if not examples:
        raise DataError(f"{spec}: no rows left after --keep_levels {','.join(cfg.keep_levels)} (dropped {dropped})")
    return examples, dropped


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Flatten each row's responses (best first) into one right-padded batch of N sequences.

    ``slots[b, k]`` is the flat index of row b's k-th best response (-1 for none), so the loss
    sees rewards as a [B, K] grid whatever mix of 2- and 3-response rows the batch holds.
    """
    seqs, slots, grades = [], [], []
    width = 3 if any(ex["edited_ids"] for ex in examples) else 2
    for ex in examples:
        row = [ex[f"{k}_ids"] for k in RESPONSES if ex[f"{k}_ids"]]
        slots.append([len(seqs) + k for k in range(len(row))] + [-1] * (width - len(row)))
        seqs.extend(row)
        grades.extend(ex["grade_labels"])
    input_ids, attention_mask = pad_batch(seqs, pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "slots": torch.tensor(slots, dtype=torch.long),
        "margin": torch.tensor([ex["margin"] for ex in examples], dtype=torch.float),
        "soft_label": torch.tensor([ex["soft_label"] for ex in examples], dtype=torch.float),
        "grade_labels": torch.tensor(grades, dtype=torch.long),  # [N, heads]
    }


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def load_backbone(cfg: RMConfig):
    """(sequence-classification model with one output, tokenizer) from a causal LM or encoder
    folder. The tokenizer may lack a chat template (then plain text is scored, see reward.model)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    path = resolve_model_path(cfg.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        torch.manual_seed(cfg.seed)  # the fresh head
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                dtype=trainable_dtype(cfg),
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
            )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a reward model from {cfg.model_name_or_path}: {first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders read the last non-pad token
    model.config.id2label = {0: REWARD_LABEL}
    model.config.label2id = {REWARD_LABEL: 0}
    return place_for_trainer(model, cfg), tokenizer  # on CUDA the Trainer places it


def add_grade_heads(model, heads: list[str], levels: int) -> None:
    """Widen the one-output head to 1 + heads*levels outputs (output 0 keeps the reward weights).

    Done after RewardTrainer's constructor, which insists on num_labels=1, and before training
    creates the optimizer.
    """
    name = next((n for n in ("score", "classifier") if isinstance(getattr(model, n, None), torch.nn.Linear)), None)
    if name is None:
        raise ModelError(f"{type(model).__name__} has no linear 'score' or 'classifier' head to add grade heads to")
    old = getattr(model, name)
    new = torch.nn.Linear(old.in_features, 1 + len(heads) * levels, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
        new.weight[0] = old.weight[0]
        if old.bias is not None:
            new.bias.zero_()
            new.bias[0] = old.bias[0]
    setattr(model, name, new)
    labels = [REWARD_LABEL] + [f"{h}={k}" for h in heads for k in range(levels)]
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.num_labels = len(labels)


def _trainer_class():
    from trl import RewardTrainer

    class RankingRewardTrainer(RewardTrainer):
        """RewardTrainer with our registry losses.

        Why an override: RewardTrainer.compute_loss hard-codes -log sigmoid(r_c - r_r - margin)
        on a [chosen; rejected] batch. Ours read up to three responses per row, a soft label and
        grade-head outputs, so compute_loss (and the collator and kept columns that feed it) are
        replaced; model set-up, tokenizer padding, checkpoints, logging and resume are TRL's.
        """

        def __init__(self, *args, loss_name: str, grade_heads: int, grade_levels: int, grade_weight: float, **kwargs):
            self.loss = get_loss(loss_name)
            self.grade_heads, self.grade_levels, self.grade_weight = grade_heads, grade_levels, grade_weight
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = [
                    "chosen_ids",
                    "rejected_ids",
                    "edited_ids",
                    "soft_label",
                    "margin",
                    "grade_labels",
                ]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits = outputs.logits
            slots = inputs["slots"]
            batch = RewardBatch(logits[:, 0][slots.clamp(min=0)], slots >= 0, inputs["margin"], inputs["soft_label"])
            loss = self.loss.fn(batch)
            if self.grade_heads:
                grade_logits = logits[:, 1:].reshape(len(logits), self.grade_heads, self.grade_levels)
                grade_loss = grade_cross_entropy(grade_logits, inputs["grade_labels"])
                loss = loss + self.grade_weight * grade_loss
                self._metrics[mode]["grade_loss"].append(grade_loss.item())
            with torch.no_grad():
                diff, mask = ordered_pairs(batch.rewards, batch.valid)
                pairs = mask.sum().clamp(min=1)
                self._metrics[mode]["accuracy"].append((((diff > 0) & mask).sum() / pairs).item())
                self._metrics[mode]["margin"].append(((diff * mask).sum() / pairs).item())
            return (loss, outputs) if return_outputs else loss

    return RankingRewardTrainer


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): ``fraction`` of the rows, shuffled with ``seed``, held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(rows) * fraction)
    if fraction and not 0 < n_eval < len(rows):
        raise DataError(
            f"eval_split {fraction} of {len(rows)} rows leaves an empty train or eval set; change eval_split"
        )
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def score_order(row: dict) -> int:
    """+1 when the row's recorded ``chosen_reward`` beats its ``rejected_reward``, -1 when it is
    below (the annotator's noise flipped the pair), 0 when they tie or are absent."""
    chosen, rejected = row.get("chosen_reward"), row.get("rejected_reward")
    if not isinstance(chosen, (int, float)) or not isinstance(rejected, (int, float)) or chosen == rejected:
        return 0
    return 1 if chosen > rejected else -1


def noise_free_accuracy(chosen: list[float], rejected: list[float], orders: list[int]) -> float | None:
    """Share of pairs the model orders as the recorded scores do (pairs with order 0 skipped)."""
    judged = [(c > r) == (o > 0) for c, r, o in zip(chosen, rejected, orders) if o != 0]
    return sum(judged) / len(judged) if judged else None


def evaluate_pairs(scorer: RewardModel, examples: list[dict]) -> dict[str, float]:
    """Pairwise accuracy and mean margin over every ordered response pair of the eval rows, and
    ``accuracy_noise_free`` where the rows carry the annotating scorer's own scores."""
    ids, pairs, firsts = [], [], []
    for ex in examples:
        row = [ex[f"{k}_ids"] for k in RESPONSES if ex[f"{k}_ids"]]
        base = len(ids)
        ids.extend(row)
        firsts.append(base + (1 if ex["edited_ids"] else 0))  # the chosen response's position
        pairs += [(base + i, base + j) for i in range(len(row)) for j in range(i + 1, len(row))]
    scores = scorer.score_ids(ids)
    metrics = pairwise_metrics([scores[i] for i, _ in pairs], [scores[j] for _, j in pairs])
    noise_free = noise_free_accuracy(
        [scores[i] for i in firsts], [scores[i + 1] for i in firsts], [ex["score_order"] for ex in examples]
    )
    return {**metrics, **({"accuracy_noise_free": noise_free} if noise_free is not None else {})}


@command(
    "rm",
    RMConfig,
    "Train a reward model on preference pairs (TRL RewardTrainer; Bradley-Terry, Llama 3 ranking, AFM soft labels).",
    order=24,
    artifacts=("model",),
    metrics={"eval_accuracy": "eval_accuracy", "noise_free": "eval_accuracy_noise_free"},
)
def run_rm(cfg: RMConfig) -> dict:
    """Run the reward-model stage; returns the stage record (also output_dir/stage.json)."""
    stage = Stage("rm", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite, resume=cfg.resume):
        return read_stage(cfg.output_dir)
    # the trainer stack (seconds to import) only for a run that trains
    import datasets
    from trl import RewardConfig

    from align.training.data import load_rows
    from align.training.tracking import StageCallback, last_value

    rows = list(enumerate(load_rows(cfg.dataset, "preference"), start=1))  # numbered for error messages
    eval_rows = list(enumerate(load_rows(cfg.eval_dataset, "preference"), start=1)) if cfg.eval_dataset else []
    if cfg.eval_split:
        rows, eval_rows = _split(rows, cfg.eval_split, cfg.seed)
    model, tokenizer = load_backbone(cfg)
    train, dropped = prepare_examples(rows, cfg.dataset, cfg, tokenizer)
    evals = prepare_examples(eval_rows, cfg.eval_dataset or cfg.dataset, cfg, tokenizer)[0] if eval_rows else []
    checkpoint = resume_checkpoint(cfg, stage)

    args = RewardConfig(**trl_args(cfg, stage), max_length=None, disable_dropout=True)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train),
        processing_class=tokenizer,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[StageCallback(stage, "rm")],
        loss_name=cfg.loss,
        grade_heads=len(cfg.grade_heads),
        grade_levels=cfg.grade_levels,
        grade_weight=cfg.grade_weight,
    )
    if cfg.grade_heads:
        add_grade_heads(trainer.model, cfg.grade_heads, cfg.grade_levels)
    run = train_to_end(trainer, stage, checkpoint)
    if run is None:  # not the main process
        return {}
    trainer.model.eval()
    artifacts = save_model(trainer.model, tokenizer, stage.dir)
    summary = {
        "loss": cfg.loss,
        "train_rows": len(train),
        "dropped_rows": dropped,
        "final_train_accuracy": last_value(stage.metrics(), "accuracy"),
        **run,
    }
    if evals:
        scorer = RewardModel(trainer.model, tokenizer, batch_size=cfg.score_batch_size, max_length=cfg.max_length)
        metrics = evaluate_pairs(scorer, evals)
        summary.update(
            {"eval_rows": len(evals), "eval_accuracy": metrics["accuracy"], "eval_mean_margin": metrics["mean_margin"]}
        )
        if "accuracy_noise_free" in metrics:
            summary["eval_accuracy_noise_free"] = metrics["accuracy_noise_free"]
    return finish_training(stage, cfg, summary, artifacts, ["loss", "accuracy"])
