"""Tiny randomly initialized causal LMs, written as Hugging Face folders.

``make_tiny_model`` builds a seeded random model plus an offline tokenizer (character-level or a
small byte-level BPE) with a chat template, and saves everything so that transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer``) and vLLM's CPU engine can load the folder. These
models are what the tests, the demo task and the benchmarks train from scratch.

Architectures and tokenizers are registries (``ARCHS``, ``TOKENIZERS``): add an entry to support
a new one.
"""

from __future__ import annotations

import pathlib
import string
from typing import Callable

from align.core.errors import ConfigError

# vLLM's CPU attention accepts only these head sizes (docs/vllm-cpu.md#2).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

PAD, BOS, UNK = "<|pad|>", "<|bos|>", "<|unk|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, UNK, SYSTEM, USER, ASSISTANT, END]
# With ``end_of_text``: the EOS of a base model whose chat template closes turns with another
# token (Qwen2.5 base: <|endoftext|> vs <|im_end|>; gemma-2 base: <eos> vs <end_of_turn>).
END_OF_TEXT = "<|endoftext|>"

# Each message is <|role|>content<|end|>. The assistant's content and its <|end|> sit inside
# {% generation %} so that apply_chat_template(..., return_assistant_tokens_mask=True) (and TRL's
# assistant_only_loss) can tell which tokens the model is trained to produce.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# Printable ASCII, including " " and "\n", without the vertical tab and form feed.
CHAR_ALPHABET = "".join(c for c in string.printable if c not in "\x0b\x0c")

# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---------------------------------------------------------------------------------- tokenizers


def _wrap(tokenizer_object, eos: str):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=BOS,
        eos_token=eos,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=None,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode map used by byte-level BPE (" " -> "Ġ", "\\n" -> "Ċ")."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    bs += list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pipeline(tk):
    """Normalizer, pre-tokenizer and decoder shared by both tokenizers.

    They are the ones transformers' ``Qwen2Tokenizer`` rebuilds on load (AutoTokenizer picks that
    class for ``model_type == "qwen2"`` whatever tokenizer.json says), so a folder tokenizes the
    same way whichever architecture it was saved with and whoever loads it (transformers, vLLM).
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _char_tokenizer(vocab_size: int, specials: list[str], eos: str):
    """One token per printable ASCII character, plus the special tokens (``vocab_size`` is ignored).

    Built as a byte-level BPE with no merges over the printable ASCII bytes, so it never joins two
    characters and decodes text exactly. Other characters become ``<|unk|>`` (a ``qwen2`` folder
    drops them instead: transformers rebuilds that tokenizer without an unknown token).
    """
    from tokenizers import Tokenizer, models

    byte_symbol = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in CHAR_ALPHABET:
        vocab[byte_symbol[ord(ch)]] = len(vocab)
    tk = _byte_level_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK)))
    tk.add_special_tokens(specials)
    return _wrap(tk, eos)


_WORDS = (
    "the a an one two three four five six seven eight nine ten plus minus sum of and is "
    "equals answer question what add number numbers digit digits carry result total model "
    "learns to count small large first second last more less than make take give good bad "
    "right wrong yes no please thank you I we they it this that here there when why how "
    "user assistant system says reply helpful short long word words text line lines"
).split()


def _bpe_corpus(n_lines: int = 3000) -> list[str]:
    """A small deterministic English + arithmetic corpus for training the BPE tokenizer."""
    import random

    rng = random.Random(1234)
    lines = []
    for i in range(n_lines):
        if i % 3 == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"{a}+{b}={a + b}")
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
            lines.append(sentence)
    lines.append(CHAR_ALPHABET)
    return lines


def _bpe_tokenizer(vocab_size: int, specials: list[str], eos: str):
    """A byte-level BPE with ``vocab_size`` entries trained in-process on a built-in corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    min_size = 256 + len(specials)
    if vocab_size < min_size:
        raise ConfigError(
            f"tokenizer 'bpe' needs vocab_size >= {min_size} (256 bytes + special tokens), got {vocab_size}"
        )
    tk = _byte_level_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_bpe_corpus(), trainer=trainer)
    return _wrap(tk, eos)


TOKENIZERS: dict[str, Callable] = {"char": _char_tokenizer, "bpe": _bpe_tokenizer}


# ------------------------------------------------------------------------------- architectures


def _common(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_pos, ids):
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,  # docs/vllm-cpu.md#3: tied lm_head may not reload in vLLM CPU
        **ids,
    )


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(**kw))


def _qwen2_config(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(**kw), use_sliding_window=False)


ARCHS: dict[str, Callable] = {"llama": _llama_config, "qwen2": _qwen2_config}


def _lookup(registry: dict, kind: str, name: str):
    if name not in registry:
        valid = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {kind} {name!r}; valid: {valid}")
    return registry[name]


def make_tiny_model(
    output_dir,
    arch: str = "llama",
    tokenizer: str = "char",
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    vocab_size: int = 512,
    end_of_text: bool = False,
) -> pathlib.Path:
    """Write a seeded random fp32 causal LM with tokenizer and chat template to ``output_dir``.

    The same ``seed`` gives identical weights. For ``tokenizer="char"`` the model's vocabulary is
    the tokenizer's (``vocab_size`` is ignored); for ``"bpe"`` it is ``vocab_size``. The chat
    template closes every turn with ``<|end|>``, which is also the EOS; with ``end_of_text`` the
    EOS is an extra ``<|endoftext|>`` token instead, as in a base model whose turns end with a
    token that is not its EOS. Returns the folder's path.
    """
    build_config = _lookup(ARCHS, "arch", arch)
    build_tokenizer = _lookup(TOKENIZERS, "tokenizer", tokenizer)
    for name, value in [
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ]:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ConfigError(
            f"head_dim = hidden_size / num_heads = {head_dim} is not supported by vLLM's CPU "
            f"attention; use one of {', '.join(map(str, VLLM_CPU_HEAD_DIMS))} "
            f"(e.g. hidden_size=128, num_heads=2)"
        )

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    specials = SPECIAL_TOKENS + [END_OF_TEXT] if end_of_text else SPECIAL_TOKENS
    tok = build_tokenizer(vocab_size, specials, END_OF_TEXT if end_of_text else END)
    ids = dict(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = build_config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_pos=max_position_embeddings,
        ids=ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**ids)

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained draws a "Writing model shards" bar
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # Older transformers keep the template only inside tokenizer_config.json.
    template_file = out / "chat_template.jinja"
    if not template_file.exists():
        template_file.write_text(CHAT_TEMPLATE)
    return out


__all__ = ["ARCHS", "TOKENIZERS", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_model"]
