"""``align distill``: train a student on a teacher's token distributions (knowledge distillation).

    align distill --model_name_or_path runs/tiny --teacher runs/sft/model \\
        --dataset runs/demo/sft.jsonl --eval_dataset runs/demo/test.jsonl --output_dir runs/distill

Each step trains the student to match the teacher's full next-token distribution at every
response position, on one of two kinds of sequences (GKD, Agarwal et al. 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes"; Gemma 2, sec. 4, which
distills in SFT "on the student's own samples" without giving the loss or the mix):

* with probability ``lmbda``: the student's own sample for the step's prompts (on-policy);
* otherwise: the dataset's fixed responses (supervised KD), or with ``seq_kd`` the teacher's samples.

The divergence is GKD's generalized Jensen-Shannon divergence with interpolation ``beta``
(0: forward KL(teacher || student), 1: reverse KL(student || teacher)).

Engine: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) does the sampling, the mixing and the loss;
it implements GKD as published. TRL's ``DistillationTrainer`` is on-policy only (no fixed
responses), so it does not fit. Ours around it: the shared-vocabulary check before any weights
are loaded (one line naming both models and sizes), the data normalization of ``align sft``
(TRL, Alpaca or ShareGPT rows; the final assistant turn is the response), the stage output
contract (``align.core.stage_dir``: stage.json, metrics.jsonl, ``model/``, ``--resume``), the
held-out measure below, which GKDTrainer lacks, and the per-step normalization of
``StepMeanGKDTrainer``.

Each micro-batch's loss is the mean divergence over its own response tokens, and micro-batches
of one optimizer step weigh the same, so ``lmbda`` is the on-policy share of the training signal.
TRL 1.16's ``GKDTrainer`` divides instead by transformers' ``num_items_in_batch``, the label
tokens of the dataset batch counted before the swap to generated samples; an on-policy step was
then scaled by (its sample tokens) / (the dataset response tokens), not by 1.

Held-out KL (``eval_dataset``): the teacher answers each held-out prompt greedily once; the
student's mean per-token KL(teacher || student) over those answer tokens is measured before and
after training (``heldout_kl_before``, ``heldout_kl`` in stage.json, the stage's key metric).
With ``eval_reward`` the trained student's greedy answers are also scored, as in ``align sft``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, ModelError
from align.core.registry import command
from align.core.stage_dir import CheckpointOptions, Stage, read_stage
from align.training.data import load_rows
from align.training.evaluation import EvalOptions, load_prompts
from align.training.models import (
    DTYPES,
    ModelOptions,
    load_causal_lm,
    load_tokenizer,
    peft_config,
    place_for_trainer,
    resolve_model_path,
    save_model,
)
from align.training.trainer import TrainOptions, finish_training, resume_checkpoint, train_to_end, trl_args


@dataclasses.dataclass
class DistillConfig(TrainOptions, ModelOptions, EvalOptions, CheckpointOptions, BaseConfig):
    inputs = ("model_name_or_path", "teacher", "dataset", "eval_dataset", "eval_reward")
    teacher: str = required("Teacher model (folder, .gguf file or Hub id); it must share the student's vocabulary.")
    dataset: str = required(
        "Prompts with fixed responses (TRL, Alpaca or ShareGPT format): the supervised part; on-policy steps use only the prompts."
    )
    output_dir: str = required("Stage directory: stage.json, metrics.jsonl, model/ and checkpoints/ go here.")
    lmbda: float = option(
        0.5,
        "GKD's lambda: the fraction of steps trained on the student's own samples (0: fixed responses only, 1: on-policy only).",
    )
    beta: float = option(
        0.5,
        "GKD's generalized JSD interpolation, in [0, 1]: 0 is forward KL(teacher || student), 1 reverse KL(student || teacher).",
    )
    temperature: float = option(1.0, "Sampling temperature of the on-policy (and seq_kd) samples.")
    max_new_tokens: int = option(128, "Longest on-policy (and seq_kd) sample, in tokens.")
    seq_kd: bool = option(
        False,
        "Off-policy steps train on the teacher's own samples instead of the dataset's responses (sequence-level KD).",
    )
    eval_max_prompts: int = option(
        64, "Held-out prompts (the first N of eval_dataset) the student's KL to the teacher is measured on."
    )
    seed: int = option(0, "Random seed (on-policy draws, sampling, data order).")

    def validate(self) -> None:
        self.validate_training()
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"'{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"'temperature' must be positive, got {self.temperature}")
        for name in ("max_new_tokens", "eval_max_prompts", "eval_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        if self.merge_lora and not (self.use_lora or self.load_in_4bit):
            raise ConfigError("'merge_lora' needs use_lora (or load_in_4bit); a full fine-tune is already merged")


# ---------------------------------------------------------------------------------------------
# Teacher and vocabulary
# ---------------------------------------------------------------------------------------------


def vocab_mismatch(student: tuple[str, int, dict], teacher: tuple[str, int, dict]) -> str | None:
    """Why two (name, model vocab_size, tokenizer vocab) cannot be distilled one into the other, or None."""
    (s_name, s_size, s_vocab), (t_name, t_size, t_vocab) = student, teacher
    if s_size != t_size or len(s_vocab) != len(t_vocab):
        return (
            f"teacher {t_name} has a vocabulary of {t_size} ids ({len(t_vocab)} tokens) but student {s_name} has"
            f" {s_size} ({len(s_vocab)} tokens); distillation compares next-token distributions id by id,"
            " so pick a teacher and student with the same tokenizer (one model family)"
        )
    differ = sorted(tok for tok in s_vocab if t_vocab.get(tok) != s_vocab[tok])
    if differ:
        tok = differ[0]
        return (
            f"teacher {t_name} and student {s_name} both have {s_size} ids but map tokens differently"
            f" ({len(differ)} differ, e.g. {tok!r}: id {t_vocab.get(tok)} vs {s_vocab[tok]}); distillation needs"
            " one shared tokenizer"
        )
    return None


def check_shared_vocabulary(cfg: DistillConfig) -> None:
    """ModelError unless teacher and student have the same model vocabulary and token -> id map
    (read from their configs and tokenizers: no weights are loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    def vocabulary(name: str) -> tuple[str, int, dict]:
        path = resolve_model_path(name)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelError(
                f"cannot load the config or tokenizer of {name}: {str(err).strip().splitlines()[0]}"
            ) from None
        return name, config.get_text_config().vocab_size, tokenizer.get_vocab()

    why = vocab_mismatch(vocabulary(cfg.model_name_or_path), vocabulary(cfg.teacher))
    if why:
        raise ModelError(why)


def load_teacher(cfg: DistillConfig):
    """The teacher in eval mode, in the student's dtype and placed as the student (never LoRA or 4-bit)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.teacher),
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load teacher from {cfg.teacher}: {str(err).strip().splitlines()[0]}") from None
    return place_for_trainer(model, cfg).eval()  # on CUDA the trainer places it (prepare_model)


def conversations(spec: str):
    """The dataset as GKDTrainer's collator reads it: one ``messages`` list per row (prompt turns,
    then the response); any format ``align sft`` accepts."""
    import datasets

    return datasets.Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in load_rows(spec, "sft")])


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def gkd_trainer_class():
    """``StepMeanGKDTrainer``: TRL's GKDTrainer with every step normalized by its own tokens."""
    import warnings

    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():  # GKDTrainer is the engine on purpose (module docstring)
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.gkd import GKDTrainer

    class StepMeanGKDTrainer(GKDTrainer):
        """GKDTrainer whose loss is the mean generalized JSD over the step's own response tokens.

        GKD (Agarwal et al. 2024) measures a sequence by the mean of its token-level divergences,
        whether the sequence is the student's sample or a fixed response. TRL 1.16's
        ``compute_loss`` divides the sum by ``num_items_in_batch``, which transformers counts on
        the dataset's labels before ``training_step`` swaps in the student's (or teacher's)
        samples, so it is ignored here: the divergence is averaged over the current labels'
        tokens (GKDTrainer's own ``batchmean``), and transformers divides by the gradient
        accumulation steps (``loss_is_scaled_for_ga = False``). Departure from the paper: the
        mean pools the tokens of the micro-batch's sequences instead of averaging per sequence.
        """

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

    return StepMeanGKDTrainer


# ---------------------------------------------------------------------------------------------
# Held-out KL
# ---------------------------------------------------------------------------------------------


def teacher_sequences(
    teacher, tokenizer, prompts: list[list[dict]], max_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the teacher's greedy answer ids) per prompt: the fixed held-out sequences."""
    from sampling.base import SamplingParams, encode_prompts
    from sampling.hf import TransformersEngine

    answers = TransformersEngine(teacher, tokenizer).generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens)
    )
    return [(ids, cands[0].token_ids) for ids, cands in zip(encode_prompts(tokenizer, prompts), answers)]


def heldout_kl(
    student, teacher, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32
) -> tuple[float, int]:
    """(mean per-token KL(teacher || student) over the answer tokens, number of tokens).

    At each answer position t the two models' next-token distributions given prompt + answer[:t]
    are compared over the whole vocabulary."""
    import torch
    import torch.nn.functional as F

    from sampling.logprobs import pad_batch

    total, count = 0.0, 0
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = [p + a for p, a in sequences[start : start + batch_size]]
                ids, attention = (t.to(device) for t in pad_batch(batch, pad_id))
                mask = torch.zeros(len(batch), ids.shape[1], dtype=torch.bool, device=device)
                for row, (p, a) in enumerate(sequences[start : start + batch_size]):
                    mask[row, len(p) - 1 : len(p) + len(a) - 1] = True  # positions that predict an answer token
                s_logp = F.log_softmax(student(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
                t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
                kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
                total += kl[mask].sum().item()
                count += int(mask.sum().item())
    finally:
        student.train(was_training)
    if count == 0:
        raise ModelError(
            "the teacher's held-out answers are all empty (it ends every answer at once); cannot measure KL"
        )
    return total / count, count


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@command(
    "distill",
    DistillConfig,
    "Knowledge distillation from a teacher (TRL GKDTrainer): fixed responses and on-policy samples.",
    order=27,
    artifacts=("model",),
    metrics={"held_out": "eval_mean_reward", "heldout_kl": "heldout_kl"},
)
def run_distill(cfg: DistillConfig) -> dict:
    """Run the distillation stage; returns the stage record (also written to output_dir/stage.json)."""
    import warnings

    stage = Stage("distill", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite, resume=cfg.resume):
        return read_stage(cfg.output_dir)
    check_shared_vocabulary(cfg)

    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():  # GKDTrainer is the engine on purpose (module docstring)
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.gkd import GKDConfig

    from align.training.tracking import StageCallback, evaluate_trained

    tokenizer = load_tokenizer(cfg)
    train = conversations(cfg.dataset)
    heldout = load_prompts(cfg.eval_dataset, cfg.eval_max_prompts) if cfg.eval_dataset else []
    model = load_causal_lm(cfg)
    teacher = load_teacher(cfg)
    checkpoint = resume_checkpoint(cfg, stage)

    summary: dict[str, Any] = {}
    if heldout:
        sequences = teacher_sequences(teacher, tokenizer, [r["prompt"] for r in heldout], cfg.eval_max_tokens)
        summary["heldout_kl_before"], _ = heldout_kl(model, teacher, sequences, tokenizer.pad_token_id)

    args = GKDConfig(
        **trl_args(cfg, stage),
        max_length=cfg.max_length,
        lmbda=cfg.lmbda,
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seq_kd=cfg.seq_kd,
    )
    trainer = gkd_trainer_class()(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
        callbacks=[StageCallback(stage, "distill")],
    )
    run = train_to_end(trainer, stage, checkpoint)
    if run is None:  # not the main process
        return {}
    artifacts = save_model(trainer.model, tokenizer, stage.dir, merge_lora=cfg.merge_lora)
    summary.update({"train_rows": len(train), **run})
    if heldout:
        summary["heldout_kl"], summary["heldout_kl_tokens"] = heldout_kl(
            trainer.model, teacher, sequences, tokenizer.pad_token_id
        )
        summary["heldout_kl_prompts"] = len(heldout)
        if cfg.eval_reward:
            summary.update(evaluate_trained(trainer.model, tokenizer, cfg, stage))
    return finish_training(stage, cfg, summary, artifacts, ["loss", "learning_rate"])
