"""``align merge``: merge the weights of several models into one model folder.

    align merge --models runs/dpo_a,runs/dpo_b --method average --output_dir runs/soup
    align merge --models runs/rl_a,runs/rl_b --method slerp --base runs/sft --t 0.5 --eta 0.5 \\
        --output_dir runs/warp

Methods (``align.training.merging.METHODS``): Llama 3's model soup (``average``, weighted) and WARP's
spherical interpolation of task vectors with interpolation back toward the base (``slerp``, as
Gemma 2 uses it). Each ``--models`` entry is a model folder or a stage dir: ``DIR/model`` is
taken, or, for a LoRA run without a merged model, ``DIR/adapter`` merged into its base first.

Before anything is written, every model is checked against the first: the same ``model_type``,
the same tensor names and the same shapes; a mismatch is one line naming the config key or the
tensor (and both shapes). The output is ``DIR/model`` (float32 safetensors, config and tokenizer
from the first model) with the stage contract's ``stage.json`` (method, inputs, weights, tensor
counts). All models are held in memory at once (float32), so the merge needs about N x the size of
one model in RAM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, ModelError
from align.core.registry import command
from align.core.stage_dir import Stage, read_stage, staging_dir
from align.training.merging import METHODS


@dataclasses.dataclass
class MergeConfig(BaseConfig):
    run_control: ClassVar[tuple[str, ...]] = ("overwrite",)
    inputs: ClassVar[tuple[str, ...]] = ("models", "base")

    models: list[str] = required(
        "Models to merge, comma-separated: model folders or stage dirs (DIR/model, else DIR/adapter merged into its base)."
    )
    output_dir: str = required("Stage directory: stage.json and model/ go here.")
    method: str = option(
        "average", "Merge method: " + "; ".join(f"{n} ({m.source})" for n, m in METHODS.items()) + ".", choices=METHODS
    )
    weights: list[float] = option([], "average: one weight per model (normalized to sum 1); empty: uniform.")
    base: str | None = option(
        None,
        "slerp: the model the task vectors start from (model folder or stage dir), e.g. the SFT model both RL runs started from.",
    )
    t: float = option(
        0.5, "slerp: interpolation between the two task vectors, in [0, 1] (0: the first model's, 1: the second's)."
    )
    eta: float = option(
        1.0,
        "slerp: WARP's interpolation toward the base, in [0, 1]: base + eta * slerp(...) (1: no pull back, 0: the base).",
    )
    overwrite: bool = option(False, "Replace a finished stage in output_dir.")

    def validate(self) -> None:
        method = METHODS[self.method]
        if len(self.models) < 2:
            raise ConfigError(f"'models' needs at least two models to merge, got {len(self.models)}")
        if method.max_models is not None and len(self.models) > method.max_models:
            raise ConfigError(
                f"method '{self.method}' merges exactly {method.max_models} models, got {len(self.models)};"
                " chain merge stages pairwise for more"
            )
        if self.weights and self.method != "average":
            raise ConfigError(f"'weights' is only used by the average method, not '{self.method}'")
        if self.weights and len(self.weights) != len(self.models):
            raise ConfigError(
                f"'weights' has {len(self.weights)} values for {len(self.models)} models; give one per model"
            )
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"'weights' must be non-negative with a positive sum, got {self.weights}")
        if method.needs_base and not self.base:
            raise ConfigError(f"method '{self.method}' needs 'base': the model the task vectors are relative to")
        if self.base and not method.needs_base:
            raise ConfigError(f"'base' is not used by method '{self.method}'; remove it")
        if not 0.0 <= self.t <= 1.0:
            raise ConfigError(f"'t' must be in [0, 1], got {self.t}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"'eta' must be in [0, 1], got {self.eta}")

    def resolved_weights(self) -> list[float]:
        weights = self.weights or [1.0] * len(self.models)
        return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------------------------------------
# Inputs: find, load and check
# ---------------------------------------------------------------------------------------------


def resolve_source(path: str) -> tuple[str, Path]:
    """("model" | "adapter", folder) for a model folder, an adapter folder or a stage dir."""
    root = Path(path).expanduser()
    for kind, folder, marker in (
        ("model", root / "model", "config.json"),
        ("adapter", root / "adapter", "adapter_config.json"),
        ("model", root, "config.json"),
        ("adapter", root, "adapter_config.json"),
    ):
        if (folder / marker).is_file():
            return kind, folder
    raise ModelError(f"{path}: not a model folder or stage dir (no config.json, model/ or adapter/ in it)")


def load_model(kind: str, folder: Path):
    """The model in float32 on CPU; an adapter is merged into its base (from adapter_config.json)."""
    from transformers import AutoModelForCausalLM

    def load(name: str):
        try:
            return AutoModelForCausalLM.from_pretrained(
                name, dtype="float32", use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load model from {name}: {str(err).strip().splitlines()[0]}") from None

    if kind == "model":
        return load(str(folder))
    from peft import PeftModel

    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}/adapter_config.json names no base_model_name_or_path to merge the adapter into")
    return PeftModel.from_pretrained(load(base), str(folder)).merge_and_unload()


def check_compatible(reference: tuple[str, Any], other: tuple[str, Any]) -> None:
    """ModelError naming the first difference: config model_type, a tensor name, or a shape."""
    (ref_name, ref_model), (name, model) = reference, other
    ref_type, other_type = ref_model.config.model_type, model.config.model_type
    if ref_type != other_type:
        raise ModelError(
            f"{name}: config 'model_type' is '{other_type}' but {ref_name} has '{ref_type}';"
            " merge models of one architecture"
        )
    ref_state, state = ref_model.state_dict(), model.state_dict()
    missing = [k for k in ref_state if k not in state]
    extra = [k for k in state if k not in ref_state]
    if missing or extra:
        which, where = (
            (missing[0], f"missing from {name}") if missing else (extra[0], f"in {name} but not in {ref_name}")
        )
        raise ModelError(f"tensor '{which}' is {where}; merge models with the same tensors")
    for key, tensor in ref_state.items():
        if tensor.shape != state[key].shape:
            raise ModelError(
                f"tensor '{key}' has shape {tuple(tensor.shape)} in {ref_name} but {tuple(state[key].shape)}"
                f" in {name}; merge models of one architecture and size"
            )


def merge_states(states: list[dict], base: dict | None, cfg: MergeConfig) -> tuple[dict, dict[str, int]]:
    """Merge floating-point tensors name by name; others (integer buffers) must agree and are copied."""
    import torch

    method = METHODS[cfg.method]
    merged, counts = {}, {"tensors_merged": 0, "tensors_copied": 0, "parameters": 0, "linear_fallback_tensors": 0}
    for key, first in states[0].items():
        tensors = [s[key] for s in states]
        if not first.is_floating_point():
            if any(not torch.equal(first, t) for t in tensors[1:]):
                raise ModelError(f"tensor '{key}' ({first.dtype}) differs between the models and cannot be averaged")
            merged[key] = first.clone()
            counts["tensors_copied"] += 1
            continue
        merged[key], linear = method.merge(tensors, base[key] if base is not None else None, cfg)
        counts["tensors_merged"] += 1
        counts["parameters"] += first.numel()
        counts["linear_fallback_tensors"] += int(linear)
    return merged, counts


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@command(
    "merge",
    MergeConfig,
    "Merge models' weights: Llama 3's model soup (average) or WARP's SLERP of task vectors.",
    order=26,
    artifacts=("model",),
)
def run_merge(cfg: MergeConfig) -> dict:
    """Run the merge stage; returns the stage record (also written to output_dir/stage.json)."""
    from transformers import AutoTokenizer

    stage = Stage("merge", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    sources = [resolve_source(m) for m in cfg.models]
    base_source = resolve_source(cfg.base) if cfg.base else None
    models = [(str(folder), load_model(kind, folder)) for kind, folder in sources]
    base = (str(base_source[1]), load_model(*base_source)) if base_source else None
    for other in models[1:] + ([base] if base else []):
        check_compatible(models[0], other)

    merged, counts = merge_states([m.state_dict() for _, m in models], base[1].state_dict() if base else None, cfg)
    first = models[0][1]
    first.load_state_dict(merged)
    tokenizer = AutoTokenizer.from_pretrained(models[0][0])
    with staging_dir(stage.dir / "model") as tmp:
        first.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "inputs": [{"path": str(folder), "kind": kind} for kind, folder in sources],
        **(
            {"weights": cfg.resolved_weights()}
            if cfg.method == "average"
            else {"base": str(base_source[1]), "t": cfg.t, "eta": cfg.eta}
        ),
        **counts,
    }
    return stage.finish(summary, {"model": str(stage.dir / "model")})
