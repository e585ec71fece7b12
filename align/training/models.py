"""Loading and saving policy models: a path or Hub id, dtype and device, LoRA and QLoRA.

Secure defaults: ``trust_remote_code`` is off unless the config turns it on, and weights are
read and written as safetensors only (``use_safetensors=True``), never pickles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch

from align.core.config import option, required
from align.core.errors import ModelError, first_line
from align.core.gguf import resolve_model_path

DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclasses.dataclass
class ModelOptions:
    """Model fields shared by every stage that loads a policy (mixed into stage configs)."""

    model_name_or_path: str = required(
        "Policy to start from: a local Hugging Face folder, a .gguf file (converted once) or a Hub model id."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32", "Weights dtype; 'auto' keeps the checkpoint's. float32 on CPU (bf16 matmuls are slow there)."
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "Where to train: 'auto' picks cuda when available, else cpu."
    )
    trust_remote_code: bool = option(
        False, "Run model code shipped with a Hub repo. Off by default: only enable for repos you trust."
    )
    use_lora: bool = option(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = option(
        ["all-linear"], "Modules that get adapters ('all-linear' or names like q_proj,v_proj)."
    )
    load_in_4bit: bool = option(False, "QLoRA: load the base in 4-bit NF4 with bitsandbytes (implies use_lora).")
    merge_lora: bool = option(False, "Also write the adapter merged into the base weights to model/ (LoRA runs).")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def peft_config(opts: ModelOptions):
    """The peft LoraConfig for these options, or None for full fine-tuning."""
    if not (opts.use_lora or opts.load_in_4bit):
        return None
    from peft import LoraConfig

    targets = opts.lora_target_modules
    return LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(opts: ModelOptions):
    from transformers import AutoTokenizer

    path = resolve_model_path(opts.model_name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer from {opts.model_name_or_path}: {first_line(err)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"tokenizer of {opts.model_name_or_path} has no chat template; conversational data needs one"
            " (add chat_template.jinja to the model folder)"
        )
    return tok


def placement(opts: ModelOptions, local_process_index: int) -> tuple[dict[str, int] | None, str | None]:
    """Where a model a Trainer will train goes: ``(device_map for from_pretrained, device to move it
    to after loading)``.

    As TRL's trainers: on CUDA the Trainer (accelerate) places the model on this process's GPU once
    the process group exists, so loading leaves it on the host; moving it to "cuda" first would put
    every rank's copy on GPU 0. A 4-bit model cannot be moved after loading, so it is loaded onto
    this process's GPU (``device_map={"": local_process_index}``, TRL's ``get_kbit_device_map``).
    On CPU it goes to "cpu", as before.
    """
    device = opts.resolved_device()
    if opts.load_in_4bit:
        return ({"": local_process_index} if device == "cuda" else None), None
    return None, ("cpu" if device == "cpu" else None)


def cuda_has_bf16() -> bool:
    """Whether this process's CUDA GPU computes in bfloat16: Ampere or newer (compute capability 8
    and up). torch's ``is_bf16_supported()`` alone also says yes for an older GPU that only
    emulates it, where vLLM refuses bfloat16 and mixed precision is fp16's."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 and torch.cuda.is_bf16_supported()


def trainable_dtype(opts: ModelOptions, bf16: bool | None = None) -> Any:
    """The dtype to load the trained model in: ``dtype``, except that a full fine-tune under mixed
    precision (bf16, or fp16 on a GPU before Ampere) keeps fp32 weights, which autocast runs in the
    half type (TRL's default: fp32 master weights; AdamW updates on bf16 weights lose most small
    steps to rounding, and fp16 gradients cannot be unscaled). LoRA and QLoRA keep their frozen
    base in ``dtype`` (peft keeps the adapters in fp32). ``bf16``, when given, replaces the
    options' own precision (rlhf resolves its unset ``bf16`` by device); a trainer stage's unset
    ``bf16`` is resolved by its ``mixed_precision()``."""
    wanted = DTYPES[opts.dtype]
    if bf16 is not None:
        mixed = bool(bf16)
    elif hasattr(opts, "mixed_precision"):
        mixed = any(opts.mixed_precision().values())
    else:
        mixed = bool(getattr(opts, "bf16", False))
    if mixed and not (opts.use_lora or opts.load_in_4bit) and wanted in (torch.bfloat16, torch.float16):
        return torch.float32
    return wanted


def load_causal_lm(opts: ModelOptions, device: str | None = None, bf16: bool | None = None):
    """Load the model to train with the options' dtype (``trainable_dtype``) and 4-bit quantization,
    placed for a Trainer (``placement``), or on ``device`` for a loop without one (rlhf)."""
    import os

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(opts.model_name_or_path)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_map, move_to = placement(opts, local_rank)
    kwargs: dict[str, Any] = {
        "dtype": trainable_dtype(opts, bf16),
        "trust_remote_code": opts.trust_remote_code,
        "use_safetensors": True,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if opts.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if opts.dtype == "bfloat16" else torch.float32,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model from {opts.model_name_or_path}: {first_line(err)}") from None
    if device is not None and not opts.load_in_4bit:
        model.to(device)
    elif move_to is not None:
        model.to(move_to)
    return model


def place_for_trainer(model, opts: ModelOptions):
    """``model`` (loaded on the host) placed as ``placement`` says, for a Trainer to take it; returns it."""
    _, move_to = placement(opts, 0)
    return model.to(move_to) if move_to is not None else model


def save_model(model, tokenizer, out_dir: Path, merge_lora: bool = False) -> dict[str, str]:
    """Write the final model as a Hugging Face folder (safetensors + config + tokenizer + template).

    A LoRA model writes its adapter to ``adapter/`` and, with ``merge_lora``, the merged full
    model to ``model/``; a full fine-tune writes ``model/``. Its generation config lists every
    stop id (``stop_at_turn_end``). Returns {artifact: path}.
    """
    from align.core.stage_dir import staging_dir

    artifacts: dict[str, str] = {}
    is_peft = hasattr(model, "peft_config")
    stop_at_turn_end(model, tokenizer)
    if is_peft:
        with staging_dir(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        artifacts["adapter"] = str(out_dir / "adapter")
        if not merge_lora:
            return artifacts
        model = model.merge_and_unload()
    with staging_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    artifacts["model"] = str(out_dir / "model")
    return artifacts


def stop_at_turn_end(model, tokenizer) -> None:
    """List every id generation should stop on in ``model.generation_config.eos_token_id``: the
    tokenizer's EOS, the ids already there, and the chat template's end of turn
    (``sampling.base.turn_end_id``). After SFT of a base model whose template closes turns with
    another token than its EOS (Qwen2.5 base, gemma-2 base), vLLM and ``generate`` then stop where
    the trained turn ends, as TRL's SFTTrainer does when given ``eos_token``."""
    from sampling.base import stop_ids

    config = getattr(model, "generation_config", None)
    if config is None:
        return
    ids = stop_ids(tokenizer, config.eos_token_id)
    if ids:
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
