"""The policy optimizers on a real tiny model: no dropout noise in the ratio to pi_old."""

from __future__ import annotations

import pytest
import torch

from align.core.config import parse_config
from align.rl.optimizers import get_optimizer
from align.rl.rollout import build_rollouts
from align.stages.rlhf import RLHFConfig


def _lora_policy(tiny_model, cfg):
    """The tiny model with the config's LoRA (default lora_dropout 0.05) and 10% attention dropout."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align.training.models import peft_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attention_dropout=0.1)
    return get_peft_model(base, peft_config(cfg))


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_ratio_is_exactly_one_at_the_first_inner_step_with_lora(name, tiny_model, tmp_path):
    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            "unused",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            str(tmp_path),
            "--optimizer",
            name,
            "--use_lora",
            "true",
            "--inner_steps",
            "2",
            "--kl_coef",
            "0",
            "--learning_rate",
            "1e-2",
            "--forward_batch_size",
            "8",
        ],
    )
    assert cfg.lora_dropout == 0.05  # the default the loop must neutralize
    policy = _lora_policy(tiny_model, cfg)
    opt = get_optimizer(name)(cfg, policy, None)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 40, (4,), generator=gen).tolist() for _ in range(2)]
    responses = [[torch.randint(5, 40, (6,), generator=gen).tolist() for _ in range(4)] for _ in prompts]
    rollouts = build_rollouts(
        prompts, responses, [[False] * 4] * 2, [0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.3, 0.9], pad_id=0
    )

    ratios = []
    loss = opt.loss

    def recording_loss(r, logp, entropy, hidden):
        ratios.append(torch.exp(logp - r.logp_old)[r.mask.bool()].detach())
        return loss(r, logp, entropy, hidden)

    opt.loss = recording_loss
    # Two iterations: LoRA's B starts at zero (its dropout cannot show yet); from the second on it is not.
    for _ in range(2):
        opt.update(rollouts)
    first_steps, second_steps = ratios[0::2], ratios[1::2]
    for ratio in first_steps:
        assert torch.equal(ratio, torch.ones_like(ratio)), ratio
    for ratio in second_steps:  # the step in between really moved the policy
        assert (ratio - 1).abs().max() > 1e-4
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize(
    "name,inner_steps,kl",
    [
        ("grpo", 1, "0"),
        ("grpo", 1, "0.1"),
        ("rloo", 1, "0"),
        ("rloo", 1, "0.1"),
        ("ppo", 2, "0"),
        ("mdloo", 2, "0.1"),
        ("online_dpo", 1, "0.1"),
    ],
)
def test_backward_by_groups_gives_the_whole_batch_gradients(name, inner_steps, kl, tiny_model, tmp_path):
    """A batch larger than forward_batch_size is backpropagated a length group at a time (memory),
    right after each group's forward for row-local one-step losses (grpo, rloo without KL shaping),
    else through log-probs from a pass without gradients; the update must be the one a single
    backward through the whole batch makes."""
    from align.stages.rlhf import make_reference

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 40, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    responses = [[torch.randint(5, 40, (n,), generator=gen).tolist() for n in (2, 6, 4, 9)] for _ in prompts]
    scores = torch.rand(12, generator=gen).tolist()
    grads, stats = {}, {}
    for fbs in (64, 5):  # 64: one backward through all 12 rows; 5: three groups
        cfg = parse_config(
            RLHFConfig,
            [
                "--model_name_or_path",
                str(tiny_model),
                "--dataset",
                "unused",
                "--reward",
                "rule:arithmetic",
                "--output_dir",
                str(tmp_path),
                "--optimizer",
                name,
                "--use_lora",
                "true",
                "--inner_steps",
                str(inner_steps),
                "--kl_coef",
                kl,
                "--learning_rate",
                "1e-3",
                "--forward_batch_size",
                str(fbs),
            ],
        )
        policy = _lora_policy(tiny_model, cfg)
        for key, value in policy.named_parameters():  # LoRA's B off zero: every adapter weight gets a gradient
            if "lora_B" in key:
                value.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(key) % 2**31))
        opt = get_optimizer(name)(cfg, policy, make_reference(cfg, policy))
        assert opt.row_local() == (name == "grpo" or (name == "rloo" and kl == "0"))
        rollouts = build_rollouts(prompts, responses, [[False, True, False, True]] * 3, scores, pad_id=0)
        stats[fbs] = opt.update(rollouts)
        # .grad holds the last inner step's gradients (zeroed at the start of each step)
        grads[fbs] = {k: v.grad.clone() for k, v in policy.named_parameters() if v.requires_grad}
        grads[fbs].update({f"extra.{k}": v.grad.clone() for m in opt.extra.values() for k, v in m.named_parameters()})
    assert grads[64].keys() == grads[5].keys() and len(grads[5]) > 0
    for key, value in grads[64].items():
        assert value.abs().max() > 0, key  # a gradient to compare
        torch.testing.assert_close(grads[5][key], value, rtol=1e-3, atol=1e-3 * value.abs().max().item(), msg=key)
    assert stats[5].keys() == stats[64].keys()
    for key, value in stats[64].items():
        assert stats[5][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
