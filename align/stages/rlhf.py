"""``align rlhf``: the experience loop with a pluggable optimizer (online DPO, PPO, MDLOO, GRPO, RLOO).

    align rlhf --config configs/demo_rlhf.yaml --model_name_or_path runs/sft/model \
        --dataset runs/demo/prompts.jsonl --optimizer mdloo --output_dir runs/rlhf

Each iteration, read top to bottom in ``run_rlhf``:
  1. take the next ``prompts_per_iteration`` prompts (a seeded order per epoch: resumable);
  2. the in-process engine (vLLM when it is installed) samples K = ``num_samples`` responses each;
  3. the scorers score the decoded text (own tokenizers; NaN stops the run naming the prompt);
  4. the optimizer computes log-probs under the policy (and reference) and takes its steps;
  5. the new weights go into the engine (LoRA: merged into new tensors, the base left as it is);
  6. one metrics row (reward, KL, entropy, length, truncated share, clip fraction, time split) and a checkpoint
     every ``save_every`` iterations;
  7. after SIGTERM/SIGUSR1 (``align.core.preempt``): a checkpoint of this iteration, then exit code 3;
     ``--resume`` continues with the next iteration.

Why our own loop: TRL's online trainers each own generation and cannot swap the optimizer, TRL
has no PPO or MDLOO, and its colocated vLLM sync fails on CPU in fp32 (docs/vllm-cpu.md#9).

Multi-process (``accelerate launch``, e.g. configs/accelerate/cpu_2proc.yaml): data parallel with
an engine per rank. Each rank generates, scores and computes the loss for its shard of every
prompt batch, gradients are averaged across ranks (``align.rl.parallel`` says why not DDP's
wrapper and not one engine with a broadcast), every rank syncs its own engine, and the main
process logs metrics gathered from all ranks and writes every file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from align.core import preempt
from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, ModelError
from align.core.heap import keeps_freed_memory
from align.core.registry import command
from align.core.stage_dir import CHECKPOINT_RECORD, CheckpointOptions, Stage, checkpoint_dir, read_stage
from align.rl import parallel
from align.rl.merging_optimizer import OnlineMergingOptions
from align.rl.monitor import MONITOR_FILE, MonitorOptions
from align.rl.optimizers import OPTIMIZERS
from align.training.evaluation import RewardOptions
from align.training.models import ModelOptions, cuda_has_bf16, load_causal_lm, load_tokenizer, peft_config, save_model
from align.training.trainer import REPORT_TO_HELP
from reward.rules import RULES
from sampling.engines import EngineOptions, cpu_threads
from sampling.speed import describe, generation_speed
from sampling.vllm_engine import SLEEP_MODE_NEEDS_GPU


@dataclasses.dataclass
class RLHFConfig(
    RewardOptions, EngineOptions, ModelOptions, OnlineMergingOptions, MonitorOptions, CheckpointOptions, BaseConfig
):
    inputs = (
        "model_name_or_path",
        "dataset",
        "reward",
        "eval_dataset",
        "eval_reward",
        "monitor_dataset",
        "monitor_judges",
    )
    run_control: ClassVar[tuple[str, ...]] = (
        "overwrite",
        "resume",
        "kv_cache_gb",
        "kv_block_size",
        "threads",
        "enforce_eager",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "sleep_mode",
    )
    dataset: str = required("Prompts to train on (prompt rows; extra columns such as `answer` reach the scorers).")
    output_dir: str = required("Stage directory: stage.json, metrics.jsonl, model/, checkpoints/.")
    optimizer: str = option("rloo", "Policy optimizer (align/rl/optimizers.py).", choices=OPTIMIZERS)
    num_iterations: int = option(100, "Experience iterations (generate -> score -> update -> sync).")
    prompts_per_iteration: int = option(16, "Prompts sampled per iteration.")
    num_samples: int = option(4, "K: responses sampled per prompt.")
    max_tokens: int = option(64, "Longest sampled response, in tokens.")
    temperature: float = option(
        1.0,
        "Sampling temperature for rollouts; the policy, old-policy and reference log-probs of the loss are taken at it too (logits / temperature), as TRL's GRPO/RLOO do.",
    )
    top_p: float = option(
        1.0,
        "Nucleus sampling for rollouts. Only 1.0: the loss would need the truncated policy's log-probs, which no optimizer here computes.",
    )
    learning_rate: float = option(1e-5, "AdamW learning rate for the policy (and value head).")
    warmup_steps: int = option(
        0,
        "Optimizer steps over which the learning rate rises linearly to learning_rate (0: none). Adam's"
        " first steps move every weight by about learning_rate whatever the size of its gradient; a"
        " warmup (as TRL's and OpenRLHF's trainers offer) lets its moment estimates settle first.",
    )
    forward_batch_size: int = option(
        32,
        "Sequences per training forward/backward pass, grouped by length so each pads only to its own longest; at most this many hold activations at once (memory).",
    )
    inner_steps: int = option(
        1, "Optimizer steps per iteration on the same rollouts (PPO epochs; MDLOO's mirror-descent steps)."
    )
    clip_eps: float = option(0.2, "Ratio clipping for ppo/grpo/rloo (and value clipping for ppo).")
    kl_coef: float = option(
        0.05,
        "KL-to-reference coefficient (reward shaping for ppo/rloo, AFM's beta for mdloo, loss term for grpo); 0 skips the reference.",
    )
    beta: float = option(0.1, "online_dpo: DPO beta.")
    nll_coef: float = option(
        0.0, "online_dpo: weight of an NLL term on the chosen response (Llama 3 used 0.2); 0 is Qwen2's plain DPO."
    )
    mdloo_t: float = option(1.0, "mdloo: mirror-descent step size t (the KL-to-previous-policy term is weighted 1/t).")
    vf_coef: float = option(0.1, "ppo: value loss weight.")
    gamma: float = option(1.0, "ppo: discount.")
    lam: float = option(0.95, "ppo: GAE lambda.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    mask_truncated_completions: bool = option(
        False,
        "Responses cut at max_tokens (no stop token) carry no loss; they still count in"
        " their group's reward statistics (baselines, advantages). DAPO's overlong"
        " filtering, as TRL's GRPO/RLOO option of this name. Not for online_dpo.",
    )
    missing_eos_penalty: float | None = option(
        None,
        "Subtracted from the reward of every response cut at max_tokens (no stop token)"
        " before the advantages, as TRL's OnlineDPOConfig option of this name: a reward"
        " model rescores the text with a closed turn, so it cannot see the cut. Unset: no penalty.",
    )
    save_every: int = option(10, "Write a resumable checkpoint every N iterations.")
    eval_dataset: str | None = option(None, "Held-out prompts answered greedily before and after training.")
    eval_reward: list[str] | None = option(None, "Scorer(s) for eval_dataset (default: reward).", names=RULES)
    eval_max_tokens: int = option(16, "Longest answer in evaluation.")
    seed: int = option(0, "Seed for the prompt order, sampling and initialization.")
    report_to: list[str] = option([], REPORT_TO_HELP)
    kv_cache_gb: float | None = option(
        None,
        "vLLM KV-cache size in GiB (on CPU it is host RAM, beside the trainer's)."
        " Unset: what one iteration's rollouts can need (its longest prompts x num_samples,"
        " each plus max_tokens), recorded in stage.json: 0.27 GiB for SmolLM2-135M at"
        " 16 prompts x K=4 x 32 tokens, where the other stages' 1 GiB default held 3.8x that."
        " On a GPU, unset: what gpu_memory_utilization leaves after the engine's weights.",
    )
    bf16: bool | None = option(
        None,
        "bfloat16 mixed precision for the policy's passes: autocast over fp32 weights (a full fine-tune"
        " keeps fp32 master weights whatever dtype says; TRL's default). Unset: on with a GPU that"
        " has bf16 (Ampere or newer), off on CPU.",
    )
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None,
        "vLLM's weights dtype, apart from the policy's. Unset: dtype on CPU (float32: log-probs equal the trainer's);"
        " bfloat16 on a GPU (float16 before Ampere), the gap to the trainer's log-probs then corrected by importance_sampling.",
    )
    importance_sampling: bool | None = option(
        None,
        "Truncated importance sampling (TIS; TRL's vllm_importance_sampling_correction, token_truncate mode): weigh each"
        " token's loss by min(pi_trainer / pi_engine, importance_sampling_cap), from the engine's own log-probs, so"
        " rollouts sampled by a bf16 engine train an fp32 policy without bias. grpo and ppo per token, rloo per sequence."
        " Unset: on when engine_dtype and the trained weights' dtype differ (for those optimizers).",
    )
    importance_sampling_cap: float | None = option(
        None,
        "Upper bound of the importance-sampling weights (TRL's"
        " vllm_importance_sampling_clip_max). Unset: 3.0, TRL's default.",
    )
    sleep_mode: bool = option(
        False,
        "vLLM on a GPU: free the engine's memory while the policy trains (vLLM's sleep mode, as TRL's"
        " vllm_enable_sleep_mode): it sleeps after each generation, wakes its weights for a sync and"
        " its KV cache to generate; a full fine-tune's engine discards its weights as it sleeps, so a"
        " generation with no sync before it (evaluation, monitor points) sends them again first."
        " Slower; for a GPU too small for both. Unsupported on CPU and with the transformers engine.",
    )

    def validate(self) -> None:
        self.validate_engine()
        opt = OPTIMIZERS[self.optimizer]
        if self.num_samples < opt.min_samples:
            raise ConfigError(
                f"optimizer '{self.optimizer}' needs num_samples >= {opt.min_samples} (its baseline compares the"
                f" K samples of a prompt), got {self.num_samples}"
            )
        for key in (
            "num_iterations",
            "prompts_per_iteration",
            "num_samples",
            "max_tokens",
            "inner_steps",
            "save_every",
            "forward_batch_size",
            "monitor_every",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(
                f"'temperature' must be > 0 for rollouts (the loss divides the logits by it), got {self.temperature}"
            )
        if self.top_p != 1.0:
            raise ConfigError(
                f"'top_p' must be 1.0 in rlhf, got {self.top_p}: the optimizers train on the untruncated"
                " policy's log-probs, so nucleus-sampled rollouts would be off-policy; lower --temperature instead"
            )
        if self.mask_truncated_completions and not opt.masks_truncated:
            raise ConfigError(
                f"'mask_truncated_completions' does not apply to optimizer '{self.optimizer}' (its pairs are whole"
                " responses, with no per-token loss to mask); use --missing_eos_penalty to rank truncated responses lower"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"'warmup_steps' must be >= 0 (optimizer steps; 0: no warmup), got {self.warmup_steps}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(
                f"'missing_eos_penalty' must be >= 0 (it is subtracted from the reward), got {self.missing_eos_penalty}"
            )
        refuse_sharded_training(os.environ)
        if self.sleep_mode and self.resolved_device() == "cpu":
            raise ConfigError(SLEEP_MODE_NEEDS_GPU)
        from sampling.engines import default_engine

        if self.sleep_mode and (self.engine if self.engine != "auto" else default_engine()) == "transformers":
            raise ConfigError("'sleep_mode' is vLLM's: the transformers engine has none; use --engine vllm or drop it")
        if self.importance_sampling and not OPTIMIZERS[self.optimizer].importance_sampling:
            raise ConfigError(
                f"'importance_sampling' is not supported by optimizer '{self.optimizer}' (its loss has no per-token"
                " or per-sequence ratio to weigh); use grpo, ppo or rloo, or --importance_sampling false"
            )
        if self.importance_sampling_cap is not None and self.importance_sampling_cap < 1:
            raise ConfigError(f"'importance_sampling_cap' must be >= 1, got {self.importance_sampling_cap}")
        if self.load_in_4bit:
            raise ConfigError(
                "'load_in_4bit' (QLoRA) is not supported by align rlhf: the engine needs the adapter merged into"
                " full-precision weights; use --use_lora true (with --dtype bfloat16 to halve the base's memory)"
            )
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.mdloo_t <= 0:
            raise ConfigError("'learning_rate' and 'mdloo_t' must be > 0 and 'kl_coef' >= 0")
        if self.report_to:
            from align.training.tracking import check_trackers

            check_trackers(self.report_to)
        self.validate_merging(lora=self.use_lora or self.load_in_4bit)


# ---------------------------------------------------------------------------------------------
# Devices, precision and weight syncs
# ---------------------------------------------------------------------------------------------


def refuse_sharded_training(env: dict[str, str]) -> None:
    """One line, exit 2, under DeepSpeed or FSDP (accelerate's launch variables): the loop syncs each
    rank's full weights into its engine and averages plain gradients, so sharded weights (ZeRO,
    FSDP) would be silently ignored or incomplete; gathering them per parameter is not implemented."""
    for key, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if env.get(key, "").strip().lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"align rlhf does not support {name}: it needs each process's full weights to sync its engine;"
                " launch it data parallel (accelerate launch --multi_gpu, or configs/accelerate/cpu_2proc.yaml)"
            )


def resolve_bf16(bf16: bool | None, device: str, has_bf16: bool) -> bool:
    """Whether the policy's passes run under bf16 autocast: ``bf16`` when set, else on a GPU with bf16."""
    return bf16 if bf16 is not None else device == "cuda" and has_bf16


def resolve_engine_dtype(engine_dtype: str | None, dtype: str, device: str, has_bf16: bool) -> str:
    """The engine's weights dtype: ``engine_dtype`` when set; else on CPU the policy's ``dtype``
    (float32 by default: log-probs equal the trainer's), on a GPU bfloat16 (float16 before Ampere)."""
    if engine_dtype is not None:
        return engine_dtype
    if device == "cpu":
        return dtype
    return "bfloat16" if has_bf16 else "float16"


def resolve_importance_sampling(
    setting: bool | None, optimizer: str, engine_dtype: str, trained_dtype: torch.dtype
) -> bool:
    """Whether to correct the engine/trainer log-prob gap (``importance_sampling``): as set, else on
    where the optimizer supports it and the engine's dtype is not the trained weights' (both known:
    'auto' counts as equal)."""
    if setting is not None:
        return setting
    from align.training.models import DTYPES

    engine = DTYPES[engine_dtype]
    return OPTIMIZERS[optimizer].importance_sampling and engine != "auto" and engine != trained_dtype


def weight_sync_mode(device: str, policy, engine: str = "vllm") -> str:
    """How the policy's weights reach the engine: 'full' (a full fine-tune: every weight), 'adapter'
    (a plain LoRA policy on a GPU: only the adapter, through vLLM's LoRA support, as verl's colocated
    LoRA sync), or 'merged' (the adapter merged into new tensors and sent as full weights: on CPU,
    with the transformers ``engine``, and the fallback for what vLLM's LoRA cannot load:
    ``modules_to_save``, LoRA variants such as DoRA, LoRA biases)."""
    if not hasattr(policy, "peft_config"):
        return "full"
    if device == "cpu" or engine != "vllm":
        return "merged"
    config = policy.peft_config[policy.active_adapter]
    plain = (
        not getattr(config, "modules_to_save", None)
        and not getattr(config, "use_dora", False)
        and not getattr(config, "lora_bias", False)
        and getattr(config, "peft_type", None) is not None
        and str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type) == "LORA"
    )
    return "adapter" if plain else "merged"


def policy_device(device: str, local_rank: int) -> str:
    """Where this rank's policy trains: its own GPU (LOCAL_RANK) on CUDA; rlhf has no Trainer to place it."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def autocast(enabled: bool, device: str):
    """bf16 autocast for the policy's forward passes (fp32 weights stay the optimizer's), or nothing."""
    return (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if enabled
        else contextlib.nullcontext()
    )


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def batch_indices(n: int, size: int, iteration: int, seed: int) -> list[int]:
    """Dataset rows of ``iteration``: a seeded permutation per epoch, walked in order.

    A pure function of (n, size, iteration, seed), so a resumed run draws the same next batch.
    """
    start = iteration * size
    out = []
    for pos in range(start, start + size):
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def rollout_seed_keys(seed: int, iteration: int, rank: int, world: int, size: int) -> tuple[int, ...]:
    """Seed keys (``SamplingParams.seeds``) of this rank's prompts of an iteration: one per position
    of the whole batch, distinct for every (seed, iteration, position) while an iteration has fewer
    than 2**20 prompts, so the samples do not depend on how many processes share the batch."""
    return tuple((seed << 40) + (iteration << 20) + pos for pos in range(rank, size, world))


def hf_name(name: str) -> str:
    """A peft model's parameter or module name -> the wrapped Hugging Face model's name."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


@torch.no_grad()
def lora_merged(layer) -> dict[str, torch.Tensor]:
    """A peft LoRA layer's base ``weight`` (and ``bias``) with its active adapters added, as new
    tensors; {} when no adapter changes them. The base layer is only read.

    The same sums as peft's ``LoraLayer.merge`` for plain LoRA: W + ``get_delta_weight(adapter)``
    (scale * B @ A, transposed for ``fan_in_fan_out``, in the adapter's dtype: fp32 where peft keeps
    adapters in fp32 beside a bf16 base), rounded once to W's dtype, and b + scale * B's bias for
    ``lora_bias``. Departure: peft adds them into the base weights in place, and ``unmerge``
    subtracts them again; in bf16 the two roundings do not cancel, so merging and unmerging at every
    sync drifts the base, which is also the KL reference (the policy with its adapter disabled).
    Variants with another merge rule (DoRA) are refused.
    """
    base = layer.get_base_layer()
    merged: dict[str, torch.Tensor] = {}
    for adapter in layer.active_adapters:
        if adapter in layer.merged_adapters or adapter not in {*layer.lora_A, *layer.lora_embedding_A}:
            continue
        if adapter in layer.lora_variant:
            raise ModelError(
                f"LoRA adapter '{adapter}' is a {type(layer.lora_variant[adapter]).__name__}: align rlhf"
                " syncs plain LoRA adapters only"
            )
        weight = merged.get("weight", base.weight)
        merged["weight"] = (weight + layer.get_delta_weight(adapter)).to(weight.dtype)
        if layer.lora_bias.get(adapter, False):
            bias = merged.get("bias", base.bias)
            merged["bias"] = (bias + layer.lora_B[adapter].bias * layer.scaling[adapter]).to(bias.dtype)
    return merged


@torch.no_grad()
def merged_adapter_weights(policy) -> dict[str, torch.Tensor]:
    """Hugging Face name -> new tensor for every weight a peft policy's active adapters replace: the
    LoRA layers' merged weights (``lora_merged``) and the trained copies of ``modules_to_save`` (as
    peft's ``merge_and_unload`` keeps them)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            out.update({f"{hf_name(name)}.{k}": v for k, v in lora_merged(module).items()})
        elif isinstance(module, ModulesToSaveWrapper):
            for adapter in (a for a in module.active_adapters if a in module.modules_to_save):
                out.update(
                    {f"{hf_name(name)}.{k}": v for k, v in module.modules_to_save[adapter].state_dict().items()}
                )
    return out


def policy_weights(policy) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under Hugging Face names; a peft policy's with its active adapters
    merged out of place (``merged_adapter_weights``), its own weights untouched."""
    replaced = merged_adapter_weights(policy) if hasattr(policy, "peft_config") else {}
    named = []
    for name, tensor in policy.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = hf_name(name)
        named.append((name, replaced.get(name, tensor).detach()))
    return named


def sync_engine(engine, policy, adapter_dir: Path | None = None) -> None:
    """Send the current weights to the engine; a LoRA policy's merged into new tensors
    (``policy_weights``), which for the sync holds one more copy of the adapted weights. With
    ``adapter_dir`` (``weight_sync_mode`` 'adapter'), only the adapter: saved there as a peft folder
    and loaded by the engine's LoRA support, its base weights untouched."""
    if adapter_dir is not None:
        policy.save_pretrained(adapter_dir, safe_serialization=True)
        engine.load_adapter(str(adapter_dir))
        return
    engine.load_weights(policy_weights(policy))


class SyncedEngine:
    """The engine, with the policy's current weights sent to it again before any generate that
    finds them discarded (``weights_discarded``: a full-weights engine in sleep mode sleeps at
    level 2 after every generate). The loop syncs once per update, but it also generates without
    one in between: the held-out evaluation before and after training, and the monitor points
    after an iteration's sync; each of those would otherwise meet an engine without weights. As
    TRL's colocated generate, which calls ``sync_weights`` first whenever its weights sleep.
    Everything else is the engine's own."""

    def __init__(self, engine, policy, adapter_dir: Path | None = None):
        self.engine, self.policy, self.adapter_dir = engine, policy, adapter_dir

    def generate(self, prompts, params):
        if getattr(self.engine, "weights_discarded", False):
            sync_engine(self.engine, self.policy, self.adapter_dir)
        return self.engine.generate(prompts, params)

    def __getattr__(self, name: str):
        if name == "engine":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)


def make_reference(cfg: RLHFConfig, policy):
    """A function (input_ids, attention_mask) -> per-token log-probs under the reference policy.

    Full fine-tuning keeps a frozen copy of the starting weights; LoRA reuses the base model with
    the adapter disabled (no second copy in memory). At the sampling temperature, as the policy's.
    """
    from align.rl.rollout import token_logprobs

    if hasattr(policy, "disable_adapter"):

        @torch.no_grad()
        def ref(input_ids, attention_mask):
            with policy.disable_adapter():
                return token_logprobs(
                    policy, input_ids, attention_mask, batch_size=cfg.forward_batch_size, temperature=cfg.temperature
                )[0]

        return ref
    frozen = load_causal_lm(cfg, device=str(next(policy.parameters()).device), bf16=False).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def ref(input_ids, attention_mask):
        return token_logprobs(
            frozen, input_ids, attention_mask, batch_size=cfg.forward_batch_size, temperature=cfg.temperature
        )[0]

    return ref


def save_checkpoint(stage: Stage, iteration: int, policy, optimizer, extra: dict[str, Any]) -> Path:
    """checkpoints/checkpoint-N: policy weights (safetensors), optimizer state + value head and
    the torch RNG (tensors, ``state.pt``), then checkpoint.json (iteration, Python RNG, ``extra``:
    plain JSON) as the completion marker (``align.core.stage_dir.checkpoint_dir``)."""
    final = stage.checkpoints_dir / f"checkpoint-{iteration}"
    record = {"iteration": iteration, "python_rng": random.getstate(), **extra}
    with checkpoint_dir(final, record) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    return final


def _with_tied(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``found`` plus the weights save_pretrained writes once for several names (an output layer
    tied to the embeddings), under each name of ``expected`` that shares storage with a found one."""
    names = {expected[k].data_ptr(): k for k in found if k in expected}
    tied = {k: found[names[t.data_ptr()]] for k, t in expected.items() if k not in found and t.data_ptr() in names}
    return {**found, **tied}


def _weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading into ``expected`` ("" when nothing): missing and
    unexpected names, and shapes that differ, each counted with a first example."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} {list(found[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    parts = [
        f"{len(names)} {what} (e.g. {names[0]})"
        for names, what in (
            (missing, "missing weights"),
            (unexpected, "unexpected weights"),
            (reshaped, "of another shape"),
        )
        if names
    ]
    return ", ".join(parts)


def load_policy_weights(path: Path, policy) -> None:
    """Load the checkpoint's policy weights (a LoRA policy: its adapter) strictly: a checkpoint
    written for another model or LoRA setting fails naming what differs, before anything loads."""
    from safetensors.torch import load_file

    is_peft = hasattr(policy, "peft_config")
    files = [path / "adapter_model.safetensors"] if is_peft else sorted(path.glob("model*.safetensors"))
    files = [f for f in files if f.is_file()]
    advice = "resume with the model and LoRA settings it was written with, or pass --overwrite to start over"
    if not files:
        kind = "LoRA adapter (adapter_model.safetensors)" if is_peft else "full model weights (model.safetensors)"
        raise ModelError(f"checkpoint {path} holds no {kind}, which this policy needs; {advice}")
    found = {k: v for f in files for k, v in load_file(f).items()}
    if is_peft:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = get_peft_model_state_dict(policy)
    else:
        expected = policy.state_dict()
        found = _with_tied(expected, found)
    mismatch = _weights_mismatch(expected, found)
    if mismatch:
        raise ModelError(f"checkpoint {path} does not fit the policy: {mismatch}; {advice}")
    if is_peft:
        set_peft_model_state_dict(policy, found)
    else:
        policy.load_state_dict(found, strict=True)


def load_checkpoint(path: Path, policy, optimizer) -> dict[str, Any]:
    """Policy weights and optimizer state from ``path``; returns checkpoint.json's record with the
    torch RNG state added (``restore_rng`` applies both RNGs)."""
    load_policy_weights(path, policy)
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain containers only
    optimizer.load_state_dict(state["optimizer"])
    return {**json.loads((path / CHECKPOINT_RECORD).read_text()), "torch_rng": state["torch_rng"]}


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python_rng"]  # JSON made the tuples lists
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])


def iteration_metrics(parts: list[dict[str, Any]]) -> dict[str, float]:
    """One metrics row from every rank's part (scores, lengths, truncation flags, optimizer stats,
    phase times).

    Rewards (the scorers', before any ``missing_eos_penalty``), lengths and ``truncated_frac`` (the
    share of responses cut at ``max_tokens``) are over all samples; optimizer stats are the mean over
    the ranks that report them; each phase takes the slowest rank's time (the others wait for it).
    """
    scores = torch.tensor([s for p in parts for s in p["scores"]])
    lengths = [n for p in parts for n in p["lengths"]]
    truncated = [t for p in parts for t in p["truncated"]]
    keys = sorted({k for p in parts for k in p["stats"]})
    stats = {
        k: sum(p["stats"][k] for p in parts if k in p["stats"]) / sum(k in p["stats"] for p in parts) for k in keys
    }
    times = {k: max(p["times"][k] for p in parts) for k in parts[0]["times"]}
    return {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std(unbiased=False).item(),
        "response_length": sum(lengths) / len(lengths),
        "truncated_frac": sum(truncated) / len(truncated),
        **stats,
        **{f"time_{k}": v for k, v in times.items()},
        "samples": len(scores),
        "samples_per_s": len(scores) / sum(times.values()),
    }


def fitting_prompts(rows: list[dict], tokenizer, cfg: RLHFConfig) -> tuple[list[dict], list[int], int]:
    """The rows whose prompt (chat template and system prompt applied) leaves ``max_tokens`` free
    in ``max_model_len``, their prompt lengths in tokens, and how many rows were skipped."""
    from sampling.base import encode_prompts

    limit = cfg.max_model_len - cfg.max_tokens
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.system_prompt)]
    kept = [(r, n) for r, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise ConfigError(
            f"every prompt of {cfg.dataset} is longer than max_model_len - max_tokens = {limit} tokens; raise --max_model_len"
        )
    return [r for r, _ in kept], [n for _, n in kept], len(rows) - len(kept)


def rollout_kv_cache_gb(
    cfg: RLHFConfig, model_config: dict, prompt_lengths: list[int], world: int, monitor_lengths: list[int] = ()
) -> float:
    """The KV cache (GiB) one rank's rollouts can need at once: its share of an iteration's prompts,
    taken as the longest there are, each sampled ``num_samples`` times to ``max_tokens``
    (``sampling.vllm_engine.kv_cache_gb_for``; ``model_config`` is the policy's, as a dict). A batch
    spans at most ``size // n + 2`` epochs of the dataset's order (``batch_indices``), so a prompt
    appears in it at most that often. With a monitor, at least what its prompts take, one sample
    each (the main rank samples them all in one call)."""
    from sampling.vllm_engine import kv_cache_gb_for

    size = cfg.prompts_per_iteration
    pool = sorted(prompt_lengths * (size // len(prompt_lengths) + 2), reverse=True)
    sized = dict(block_size=cfg.kv_block_size, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len)
    rollouts = kv_cache_gb_for(
        model_config, [n + cfg.max_tokens for n in pool[: size // world]], cfg.num_samples, **sized, dtype=cfg.dtype
    )
    if not monitor_lengths:
        return rollouts
    monitor = kv_cache_gb_for(model_config, [n + cfg.max_tokens for n in monitor_lengths], 1, **sized, dtype=cfg.dtype)
    return max(rollouts, monitor)


def first_last_tenth(values: list[float]) -> tuple[float, float]:
    """The means of the first and of the last tenth of ``values`` (at least one value each)."""
    tenth = max(1, len(values) // 10)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth


def run_summary(logged: list[dict[str, Any]]) -> dict[str, float]:
    """Mean reward and share of truncated responses over the first and last tenth of the
    iterations, and the share of the loop's time spent syncing weights into the engine."""
    metrics = [r for r in logged if "reward_mean" in r]
    loop_seconds = sum(r["time_generate"] + r["time_score"] + r["time_train"] + r["time_sync"] for r in metrics)
    summary = dict(
        zip(("reward_first_10pct", "reward_last_10pct"), first_last_tenth([r["reward_mean"] for r in metrics]))
    )
    truncated = [r["truncated_frac"] for r in metrics if "truncated_frac" in r]  # rows logged without it are left out
    if truncated:
        summary["truncated_frac_first_10pct"], summary["truncated_frac_last_10pct"] = first_last_tenth(truncated)
    summary["sync_fraction"] = sum(r["time_sync"] for r in metrics) / max(1e-9, loop_seconds)
    return summary


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _preempted(cfg: RLHFConfig, stage: Stage, iteration: int, policy, optimizer, before: dict, engine):
    """The preemption safe point at the end of an iteration: checkpoint it (unless that was just
    done), close the engine on every rank, and return the ``Interrupted`` to raise."""
    path = stage.checkpoints_dir / f"checkpoint-{iteration}"
    if stage.is_main and not path.exists():
        save_checkpoint(stage, iteration, policy, optimizer, {"before": before})
    parallel.barrier()
    engine.close()
    return preempt.stopped(f"after iteration {iteration}/{cfg.num_iterations}", f"checkpoint {path} written")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def load_monitor(cfg: RLHFConfig) -> tuple[list[dict], dict[str, Any]]:
    """The monitor's prompts and judges (none without --monitor_dataset), checked before any model loads."""
    from align.training.evaluation import check_scorer_accepts, load_prompts
    from reward.scorers import build_scorer

    if not cfg.monitor_dataset:
        return [], {}
    rows = load_prompts(cfg.monitor_dataset, cfg.monitor_max_prompts)
    judges = {spec: build_scorer(spec) for spec in cfg.monitor_judges}
    for judge in judges.values():
        check_scorer_accepts(judge, rows, cfg.monitor_dataset)
    return rows, judges


def monitor_summary(path: Path) -> dict[str, Any]:
    """stage.json's view of the monitor: its first and last points (KL, reward, judges)."""
    from align.rl.monitor import read_rows

    points = read_rows(path)
    if not points:
        return {}
    first, last = points[0], points[-1]
    out = {
        "monitor_points": len(points),
        "monitor_kl": last["kl"],
        "monitor_reward_first": first["reward"],
        "monitor_reward": last["reward"],
    }
    for spec in last["judges"]:
        out[f"monitor_{spec}_first"] = first["judges"][spec]
        out[f"monitor_{spec}"] = last["judges"][spec]
    return out


def plot_overoptimization(monitor_file: Path, path: Path, title: str) -> Path | None:
    from align.rl.monitor import overoptimization_series, read_rows
    from align.training.tracking import plot_series

    return plot_series(
        overoptimization_series(read_rows(monitor_file)), path, title, x_label="KL to the reference (nats)"
    )


@command(
    "rlhf",
    RLHFConfig,
    "Online RL: generate with vLLM, score, update with a pluggable optimizer, sync, repeat.",
    order=25,
    artifacts=("model",),
    metrics={"held_out": "eval_mean_reward", "train_reward": "reward_last_10pct", "monitor_kl": "monitor_kl"},
)
@keeps_freed_memory  # CPU steps reuse their freed activations instead of page-faulting them in (align/core/heap.py)
def run_rlhf(cfg: RLHFConfig) -> dict:
    from align.rl.rollout import build_rollouts
    from align.training.evaluation import check_scorer_accepts, evaluate, load_prompts, score_candidates
    from align.training.tracking import Trackers, plot_metrics, progress_bar
    from sampling.base import SamplingParams, encode_prompts

    device_kind = cfg.resolved_device()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":  # this rank's GPU before any process group or model (TRL's colocate mode)
        torch.cuda.set_device(local_rank)
    rank, world = parallel.init(device_kind)
    if cfg.prompts_per_iteration % world:
        raise ConfigError(
            f"'prompts_per_iteration' ({cfg.prompts_per_iteration}) must be a multiple of the"
            f" {world} processes: each generates for an equal shard of the batch"
        )
    stage = Stage("rlhf", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite, resume=cfg.resume):
        return read_stage(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # Data and scorers first: bad input fails before any model is loaded.
    rows = load_prompts(cfg.dataset)
    scorer = cfg.build_scorer()
    check_scorer_accepts(scorer, rows, cfg.dataset)
    monitor_rows, judges = load_monitor(cfg)
    tokenizer = load_tokenizer(cfg)
    rows, prompt_lengths, skipped_long = fitting_prompts(rows, tokenizer, cfg)

    has_bf16 = cuda_has_bf16()
    bf16 = resolve_bf16(cfg.bf16, device_kind, has_bf16)
    policy = load_causal_lm(cfg, device=policy_device(device_kind, local_rank), bf16=bf16)
    lora = peft_config(cfg)
    if lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora)
    optimizer_cls = OPTIMIZERS[cfg.optimizer]
    reference = make_reference(cfg, policy) if optimizer_cls.uses_reference(cfg) else None
    opt = optimizer_cls(cfg, policy, reference)
    if monitor_rows and reference is None:  # the monitor's KL needs one even when the loss does not
        reference = make_reference(cfg, policy)
    device = next(policy.parameters()).device
    trained_dtype = next(p for p in policy.parameters() if p.requires_grad).dtype
    engine_dtype = resolve_engine_dtype(cfg.engine_dtype, cfg.dtype, device_kind, has_bf16)
    correct = resolve_importance_sampling(cfg.importance_sampling, cfg.optimizer, engine_dtype, trained_dtype)
    from sampling.engines import default_engine

    sync_mode = weight_sync_mode(device_kind, policy, default_engine() if cfg.engine == "auto" else cfg.engine)

    start, before = 0, {}
    checkpoint = stage.latest_checkpoint() if cfg.resume else None
    if checkpoint is not None:  # before the engine starts: a checkpoint that does not fit fails fast
        state = load_checkpoint(checkpoint, policy, opt)
        start, before = state["iteration"], state["before"]
        stage.truncate_metrics(after_step=start)
    if monitor_rows:  # a resume keeps the points up to its checkpoint, a fresh start none
        stage.truncate_metrics(after_step=start if checkpoint is not None else -1, name=MONITOR_FILE)
    kv_cache_gb = cfg.kv_cache_gb
    if kv_cache_gb is None and device_kind == "cpu":
        monitor_lengths = [
            len(ids) for ids in encode_prompts(tokenizer, [r["prompt"] for r in monitor_rows], cfg.system_prompt)
        ]
        kv_cache_gb = rollout_kv_cache_gb(cfg, policy.config.to_dict(), prompt_lengths, world, monitor_lengths)
    vllm_options: dict[str, Any] = {"dtype": engine_dtype}
    if cfg.sleep_mode:
        vllm_options["enable_sleep_mode"] = True
    if sync_mode == "adapter":
        vllm_options["max_lora_rank"] = cfg.lora_r
    engine = cfg.build_engine(cfg.model_name_or_path, seed=cfg.seed + rank, kv_cache_gb=kv_cache_gb, **vllm_options)
    if device_kind == "cuda":
        from sampling.vllm_engine import check_colocated

        check_colocated(getattr(engine, "device", device), device)
    # the adapter as the engine loads it (a peft folder), for the run's length
    adapter_dir = Path(tempfile.mkdtemp(prefix="align-engine-adapter-")) if sync_mode == "adapter" else None
    engine = SyncedEngine(engine, policy, adapter_dir)  # evaluation and monitor points generate between syncs
    stage.record_inputs()
    if checkpoint is not None:
        restore_rng(state)
    if checkpoint is not None or cfg.sleep_mode or adapter_dir is not None:
        # resumed weights; weights a level-2 sleep discarded; the adapter the first generate uses
        sync_engine(engine, policy, adapter_dir)

    eval_reward = cfg.eval_reward or cfg.reward
    if checkpoint is None and cfg.eval_dataset and stage.is_main:
        before = {
            "eval_mean_reward_before": evaluate(engine, cfg.eval_dataset, eval_reward, cfg.eval_max_tokens)[
                "mean_reward"
            ]
        }
    summary: dict[str, Any] = {
        "prompts": len(rows),
        "skipped_long_prompts": skipped_long,
        "resumed_from_iteration": start,
        **before,
    }

    def monitor(step: int) -> None:
        from align.rl.monitor import append_row, is_monitor_step, monitor_point

        if monitor_rows and stage.is_main and is_monitor_step(step, cfg.monitor_every, cfg.num_iterations):
            append_row(
                stage.dir / MONITOR_FILE,
                monitor_point(step, engine, policy, reference, tokenizer, monitor_rows, scorer, judges, cfg),
            )

    if checkpoint is None:
        monitor(0)

    trackers = Trackers(cfg.report_to, stage, use_cpu=device_kind == "cpu", model=policy)
    progress, task = progress_bar(f"rlhf {cfg.optimizer}", cfg.num_iterations, start, show=stage.is_main)
    progress.start()
    try:
        for it in range(start, cfg.num_iterations):
            whole = [rows[i] for i in batch_indices(len(rows), cfg.prompts_per_iteration, it, cfg.seed)]
            batch = whole[rank::world]  # this rank's shard
            params = SamplingParams(
                n=cfg.num_samples,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                logprobs=correct,
                max_tokens=cfg.max_tokens,
                seeds=rollout_seed_keys(cfg.seed, it, rank, world, len(whole)),
            )
            t0 = time.perf_counter()
            candidates = engine.generate([r["prompt"] for r in batch], params)
            t1 = time.perf_counter()
            scores = score_candidates(scorer, batch, candidates)  # raises on NaN, naming the prompt
            t2 = time.perf_counter()
            rollouts = build_rollouts(
                encode_prompts(tokenizer, [r["prompt"] for r in batch], cfg.system_prompt),
                [[c.token_ids for c in cands] for cands in candidates],
                [[c.finish_reason == "length" for c in cands] for cands in candidates],
                [s for group in scores for s in group],
                tokenizer.pad_token_id,
                device,
                engine_logprobs=[[c.logprobs for c in cands] for cands in candidates] if correct else None,
            )
            with autocast(bf16, device_kind):
                stats = opt.update(rollouts)
            t3 = time.perf_counter()
            sync_engine(engine, policy, adapter_dir)
            t4 = time.perf_counter()

            row = iteration_metrics(
                parallel.gather(
                    {
                        "scores": rollouts.scores.tolist(),
                        "lengths": [len(c.token_ids) for cands in candidates for c in cands],
                        "truncated": rollouts.truncated.tolist(),
                        "stats": stats,
                        "times": {"generate": t1 - t0, "score": t2 - t1, "train": t3 - t2, "sync": t4 - t3},
                    }
                )
            )
            row = {
                "step": it + 1,
                **row,
                "batch": hashlib.sha1(",".join(r["prompt_id"] for r in whole).encode()).hexdigest()[:12],
            }
            stage.log(row)
            trackers.log(row)
            progress.update(
                task, completed=it + 1, status=f"reward {row['reward_mean']:.3f}  kl {row.get('kl_ref', 0.0):.3f}"
            )
            monitor(it + 1)
            if stage.is_main and ((it + 1) % cfg.save_every == 0 or it + 1 == cfg.num_iterations):
                save_checkpoint(stage, it + 1, policy, opt, {"before": before})
            if it + 1 < cfg.num_iterations and preempt.agreed():
                raise _preempted(cfg, stage, it + 1, policy, opt, before, engine)
    except BaseException:  # a NaN reward, a bad batch, Ctrl-C: free the engine's KV cache now
        engine.close()
        _remove(adapter_dir)
        raise
    finally:
        progress.stop()
        trackers.close()

    if cfg.eval_dataset and stage.is_main:
        after = evaluate(engine, cfg.eval_dataset, eval_reward, cfg.eval_max_tokens)["mean_reward"]
    # Data parallel keeps the replicas identical; check it (as DDP checks at start) before the
    # process group goes: closing an engine ends it, so every rank must be done with it.
    checksums = parallel.gather(sum(p.detach().double().sum().item() for p in policy.parameters()))
    parallel.barrier()
    engine.close()
    _remove(adapter_dir)
    if not stage.is_main:
        return {"stage": "rlhf", "status": "complete", "rank": rank}
    summary.update({"iterations": cfg.num_iterations, **run_summary(stage.metrics())})
    if cfg.eval_dataset:
        summary["eval_mean_reward"] = after
    summary["num_processes"] = world
    summary["engine"] = engine.name
    summary["sampler"] = getattr(engine, "sampler", engine.name)  # align's CPU sampler or vLLM's own
    summary["threads"] = cpu_threads(engine)
    generated = [r for r in stage.metrics() if "time_generate" in r]
    rows = cfg.prompts_per_iteration // world * cfg.num_samples  # responses a rank samples an iteration
    tokens = round(sum(r["response_length"] for r in generated) * rows)
    seconds = sum(r["time_generate"] for r in generated)
    speed = generation_speed(tokens, seconds, cfg.model_name_or_path, summary["threads"])
    summary.update({"generated_tokens": tokens, **{f"generate_{key}": value for key, value in speed.items()}})
    print(f"rlhf: generated {tokens:,} tokens at {describe(speed, summary['threads'])} (this process's rollouts)")
    summary["engine_dtype"] = engine_dtype
    summary["bf16"] = bf16
    summary["importance_sampling"] = correct
    summary["weight_sync"] = sync_mode
    summary["kv_cache_gb"] = kv_cache_gb
    summary["replica_weight_gap"] = max(checksums) - min(checksums)  # 0.0: every rank ended with the same policy
    artifacts = save_model(policy, tokenizer, stage.dir, merge_lora=cfg.merge_lora or lora is not None)
    plot = plot_metrics(
        stage.metrics(),
        ["reward_mean", "kl_ref", "response_length"],
        stage.dir / "reward.png",
        f"rlhf {cfg.optimizer}",
    )
    if plot:
        artifacts["plot"] = str(plot)
    if monitor_rows:
        summary.update(monitor_summary(stage.dir / MONITOR_FILE))
        plot = plot_overoptimization(
            stage.dir / MONITOR_FILE,
            stage.dir / "overoptimization.png",
            f"rlhf {cfg.optimizer}: held-out scores vs KL",
        )
        artifacts["monitor"] = str(stage.dir / MONITOR_FILE)
        if plot:
            artifacts["overoptimization_plot"] = str(plot)
    return stage.finish(summary, artifacts, keep_checkpoints=cfg.keep_checkpoints)


__all__ = [
    "RLHFConfig",
    "run_rlhf",
    "batch_indices",
    "sync_engine",
    "SyncedEngine",
    "policy_weights",
    "merged_adapter_weights",
]
