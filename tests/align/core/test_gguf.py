"""GGUF in: `align import-model` and .gguf model paths, on the real SmolLM2 file and small bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_align, smollm2_gguf

gguf = pytest.importorskip("gguf", reason="gguf not installed (scripts/setup.sh installs it)")
pytestmark = pytest.mark.slow  # each test starts `align` or converts the real model


def write_gguf(path: Path, arch: str, tensor: np.ndarray) -> Path:
    """A small GGUF file with one tensor, written with the gguf package's own writer."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_one_line_error(proc, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_import_model_writes_fp32_folder_with_template(smollm2):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and "quantization_config" not in config
    assert (smollm2 / "chat_template.jinja").read_text().count("<|im_start|>") >= 2
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        names = list(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576) and "lm_head.weight" not in names
    assert sum(f"model.layers.{i}.self_attn.q_proj.weight" in names for i in range(30)) == 30
    # The dequantized embedding is exactly gguf's own dequantization of the file's tensor.
    reader = gguf.GGUFReader(smollm2_gguf())
    token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.dequantize(token_embd.data, token_embd.tensor_type).reshape(49152, 576)
    assert torch.equal(embed, torch.from_numpy(np.ascontiguousarray(expected)))
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.decode(tok("The capital of France is Paris.").input_ids) == "The capital of France is Paris."


def test_gguf_model_path_converts_once_into_cache(tmp_path, monkeypatch):
    """A .gguf path as model_name_or_path: converted into $XDG_CACHE_HOME/align/gguf/<sha256>, once."""
    import hashlib

    from align.core import gguf as align_gguf
    from align.training.models import resolve_model_path

    src = smollm2_gguf()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = Path(resolve_model_path(str(src)))
    assert folder == tmp_path / "cache" / "align" / "gguf" / hashlib.sha256(src.read_bytes()).hexdigest()
    assert (folder / "model.safetensors").stat().st_size > 500e6 and (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging dir left behind

    def fail(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(align_gguf, "convert_gguf", fail)
    assert resolve_model_path(str(src)) == str(folder)


def test_truncated_gguf_is_one_line(tmp_path):
    src = smollm2_gguf()
    with open(src, "rb") as fh:
        head = fh.read(2_000_000)
    for name, size in (("truncated.gguf", 2_000_000), ("header.gguf", 100)):
        (tmp_path / name).write_bytes(head[:size])
        proc = run_align("import-model", tmp_path / name, tmp_path / "out")
        assert_one_line_error(proc, str(tmp_path / name), "corrupt or truncated GGUF file")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv7", np.zeros((4, 8), np.float32))
    proc = run_align("import-model", path, tmp_path / "out")
    assert_one_line_error(proc, str(path), "architecture 'rwkv7' is not supported", "supported: ", "llama", "qwen2")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "ints.gguf", "llama", np.zeros((4, 8), np.int32))
    proc = run_align("import-model", path, tmp_path / "out")
    assert_one_line_error(proc, str(path), "tensor type I32 is not supported", "Q4_1", "Q8_0", "F16")


def test_missing_gguf_path_is_one_line(tmp_path, demo_data):
    proc = run_align("import-model", tmp_path / "nope.gguf", tmp_path / "out")
    assert_one_line_error(proc, f"GGUF file not found: {tmp_path / 'nope.gguf'}")
    proc = run_align(
        "sft",
        "--model_name_or_path",
        tmp_path / "nope.gguf",
        "--dataset",
        demo_data / "sft.jsonl",
        "--output_dir",
        tmp_path / "run",
    )
    assert_one_line_error(proc, f"GGUF file not found: {tmp_path / 'nope.gguf'}")
    # nothing half-written: the inputs record (checkpoints/inputs.json) waits for training to begin
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
