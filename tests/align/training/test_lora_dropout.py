"""The CPU LoRA dropout (align/training/lora_dropout.py): nn.Dropout's distribution, gradients and reach."""

from __future__ import annotations

import math

import pytest
import torch

from align.training.lora_dropout import CpuFastDropout, _MaskedScale, keep_mask, use_fast_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_keeps_one_minus_p_and_scales_by_its_inverse(p):
    torch.manual_seed(0)
    n = 2_000_000
    keep, scale = keep_mask(torch.Size([n]), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    threshold = round(p * 2**31)
    assert scale == 2**31 / (2**31 - threshold) and abs(scale - 1 / (1 - p)) < 1e-8
    # masks of two halves are independent draws, not a repeated pattern
    assert not torch.equal(keep[: n // 2], keep[n // 2 :])


def test_training_forward_zeroes_dropped_scales_kept_and_backward_uses_the_same_mask():
    torch.manual_seed(1)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    layer = CpuFastDropout(0.2).train()
    y = layer(x)
    kept = y != 0
    assert 0.75 < kept.float().mean().item() < 0.85
    scale = 1 / (1 - 0.2)
    torch.testing.assert_close(y[kept], x.detach()[kept] * scale, rtol=1e-6, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept * scale, rtol=1e-6, atol=0)


def test_output_is_unbiased_like_nn_dropout():
    torch.manual_seed(2)
    x = torch.ones(1_000_000)
    fast, native = CpuFastDropout(0.1).train()(x), torch.nn.Dropout(0.1).train()(x)
    sigma = math.sqrt(0.1 / 0.9 / x.numel())  # std of the mean of scaled Bernoulli(0.9) / 0.9
    assert abs(fast.mean().item() - 1.0) < 5 * sigma
    assert abs(native.mean().item() - 1.0) < 5 * sigma
    assert fast.unique().tolist() == pytest.approx([0.0, 1 / 0.9])


def test_seeded_masks_repeat_and_eval_or_p0_is_the_identity():
    x = torch.randn(32, 40)
    layer = CpuFastDropout(0.3).train()
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    torch.manual_seed(8)
    c = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert layer.eval()(x) is x
    assert CpuFastDropout(0.0).train()(x) is x
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout probability"):
            CpuFastDropout(bad)


def _peft_model(tiny_model, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    return get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def test_use_fast_lora_dropout_replaces_every_lora_dropout_and_changes_no_weights(tiny_model):
    from peft.tuners.lora import LoraLayer

    model = _peft_model(tiny_model, 0.05)
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero: the adapters would add nothing, dropped or not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    before_out, before_state = model(input_ids=ids).logits, {k: v.clone() for k, v in model.state_dict().items()}

    assert use_fast_lora_dropout(model) == len(lora_layers) > 0
    assert all(
        type(m.lora_dropout["default"]) is CpuFastDropout
        and m.lora_dropout["default"].p == 0.05
        and not m.lora_dropout["default"].training
        for m in lora_layers
    )
    assert use_fast_lora_dropout(model) == 0  # already replaced
    state = model.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)
    assert torch.equal(model(input_ids=ids).logits, before_out)  # eval: no dropout either way

    model.train()
    torch.manual_seed(3)
    first = model(input_ids=ids).logits
    torch.manual_seed(3)
    assert torch.equal(model(input_ids=ids).logits, first)
    assert not torch.equal(first, before_out)  # training mode drops inputs of the adapters
    assert use_fast_lora_dropout(_peft_model(tiny_model, 0.0)) == 0  # peft uses nn.Identity for 0


@pytest.mark.slow
def test_trainer_stages_train_with_the_fast_dropout(tmp_path, tiny_model, demo_data, monkeypatch):
    from align.core.config import parse_config
    from align.stages.sft import SFTConfig, run_sft

    calls = []
    original = _MaskedScale.apply
    monkeypatch.setattr(_MaskedScale, "apply", lambda x, p: calls.append(p) or original(x, p))
    cfg = parse_config(
        SFTConfig,
        [
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / "sft.jsonl"),
            "--output_dir",
            str(tmp_path / "sft"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_length",
            "32",
            "--use_lora",
            "--lora_r",
            "4",
            "--lora_dropout",
            "0.1",
            "--save_steps",
            "1000",
        ],
    )
    record = run_sft(cfg)
    assert record["summary"]["global_step"] == 2
    from peft.tuners.lora import LoraLayer

    layers = sum(isinstance(m, LoraLayer) for m in _peft_model(tiny_model, 0.1).modules())
    assert len(calls) == 2 * layers and set(calls) == {0.1}  # one forward a step through every adapted layer


def test_rlhf_disable_dropout_turns_off_the_cpu_dropout_too():
    from align.rl.optimizers import disable_dropout

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), CpuFastDropout(0.5), torch.nn.Dropout(0.2)).train()
    disable_dropout(model)
    assert model[1].p == 0.0 and model[2].p == 0.0
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model[0](x))  # train mode, and nothing is dropped
