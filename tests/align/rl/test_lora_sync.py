"""`align rlhf`'s weight sync for a LoRA policy: the adapter is merged into new tensors for the
engine, and the base weights (the KL reference) are never written."""

from __future__ import annotations

import copy

import pytest
import torch

from align.core.config import parse_config
from align.core.errors import ConfigError
from align.stages.rlhf import RLHFConfig, sync_engine


class RecordingEngine:
    """Stands in for the engine: keeps the weights of every load_weights call."""

    def __init__(self):
        self.loads: list[dict[str, torch.Tensor]] = []

    def load_weights(self, named_tensors):
        self.loads.append({name: tensor.clone() for name, tensor in named_tensors})


def _lora_policy(tiny_model, dtype, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, **{"target_modules": ["q_proj", "v_proj", "down_proj"], **lora}
    )
    return get_peft_model(base, config)


def _base_weights(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}


@torch.no_grad()
def _train_step(policy, gen) -> None:
    """What an optimizer step does to a LoRA policy: only the adapter's weights move."""
    for p in policy.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3)


def test_a_hundred_syncs_leave_the_bf16_base_bitwise_unchanged(tiny_model):
    policy = _lora_policy(tiny_model, torch.bfloat16)
    base = _base_weights(policy)
    engine, gen = RecordingEngine(), torch.Generator().manual_seed(0)
    for _ in range(100):
        _train_step(policy, gen)
        sync_engine(engine, policy)
    changed = [n for n, p in policy.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])]
    assert changed == []
    assert not any(m.merged for m in policy.modules() if hasattr(m, "merged_adapters"))  # nothing was merged in place
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(engine.loads[-1][q], base[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_sent_weights_are_peft_merge_and_unload(dtype, tiny_model):
    """Embedding and linear adapters and a ``modules_to_save`` copy: the engine gets the Hugging
    Face names of the plain model and the tensors peft's own (in-place) merge makes: the same in
    fp32; in bf16 within its rounding (peft rounds an embedding's fp32 delta to bf16 before adding
    it, here the sum is rounded once)."""
    from transformers import AutoModelForCausalLM

    policy = _lora_policy(
        tiny_model,
        dtype,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    _train_step(policy, torch.Generator().manual_seed(1))  # the lm_head copy differs from the original too
    engine = RecordingEngine()
    sync_engine(engine, policy)
    sent = engine.loads[0]
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert sorted(sent) == sorted(merged) == sorted(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict())
    for name, tensor in merged.items():
        assert sent[name].dtype == dtype
        exact = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {}  # bf16: rtol 1.6e-2, atol 1e-5
        torch.testing.assert_close(sent[name], tensor, **exact, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (sent[q] - policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).abs().max() > 1e-3


def test_an_engine_given_the_sent_weights_computes_the_policy(tiny_model):
    """The transformers engine's model, loaded with the sent weights, gives the LoRA policy's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sampling.hf import TransformersEngine

    policy = _lora_policy(tiny_model, torch.float32)
    engine = TransformersEngine(
        AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    )
    ids = torch.tensor([[5, 9, 13, 7, 21, 8]])
    with torch.no_grad():
        before = engine.model(ids).logits
        sync_engine(engine, policy)
        after, wanted = engine.model(ids).logits, policy(ids).logits
    assert (before - wanted).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(after, wanted, rtol=1e-5, atol=1e-5)


def test_qlora_is_refused_with_what_to_use_instead(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(
            RLHFConfig,
            [
                "--model_name_or_path",
                "m",
                "--dataset",
                "d",
                "--reward",
                "rule:arithmetic",
                "--output_dir",
                str(tmp_path / "o"),
                "--load_in_4bit",
                "true",
            ],
        )
    assert str(err.value) == (
        "'load_in_4bit' (QLoRA) is not supported by align rlhf: the engine needs the adapter merged into"
        " full-precision weights; use --use_lora true (with --dtype bfloat16 to halve the base's memory)"
    )
