"""Qwen2's Online Merging Optimizer: one OnDARE and one OnTIES step by hand, then in align dpo and rlhf."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.rl.merging_optimizer import OnlineMergingAdamW, dare, ties_consensus, top_magnitude

LR, BETAS = 0.1, (0.9, 0.999)


def first_adam_step(grad: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """Adam's first update by hand: m = (1-b1) g, v = (1-b2) g^2, step = lr sqrt(1-b2)/(1-b1),
    so D = -lr sqrt(1-b2) g / (sqrt(1-b2) |g| + eps) = -lr g / (|g| + eps / sqrt(1-b2))."""
    return -lr * grad / (grad.abs() + eps / math.sqrt(1 - BETAS[1]))


def one_step(mode: str, theta0, tau, grad, **kwargs) -> tuple[torch.Tensor, OnlineMergingAdamW]:
    param = torch.nn.Parameter(theta0.clone())
    opt = OnlineMergingAdamW([param], [(param, tau)], mode=mode, betas=BETAS, **kwargs)
    param.grad = grad.clone()
    opt.step()
    return param.detach(), opt


def test_one_ondare_step_matches_hand_computation():
    theta0 = torch.tensor([0.5, -0.2, 0.1, 0.0, 0.3, -0.4, 0.2, 0.05])
    tau = torch.tensor([0.3, -0.8, 0.1, 0.2, -0.05, 0.6, -0.4, 0.7])  # theta_sft - theta_base
    grad = torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, -0.7, 0.2, 1.5])
    p, alpha, wd, eps, seed = 0.5, 0.25, 0.1, 1e-8, 3
    new, _ = one_step(
        "ondare", theta0, tau, grad, reserve_p=p, alpha=alpha, clip=1.0, lr=LR, eps=eps, weight_decay=wd, seed=seed
    )
    # The masks: the optimizer's generator draws tau's mask first (at construction), then D's.
    g = torch.Generator().manual_seed(seed)
    keep_tau, keep_delta = torch.rand(8, generator=g) < p, torch.rand(8, generator=g) < p
    assert 0 < keep_tau.sum() < 8 and 0 < keep_delta.sum() < 8 and not torch.equal(keep_tau, keep_delta)
    tau_sparse = (tau * keep_tau / p).clamp(-1.0, 1.0)
    assert (tau * keep_tau / p).abs().max() > 1 and tau_sparse.abs().max() == 1  # the clamp is exercised
    delta_sparse = first_adam_step(grad, LR, eps) * keep_delta / p
    expected = (theta0 + alpha * tau_sparse + (1 - alpha) * delta_sparse) * (1 - LR * wd)
    assert torch.allclose(new, expected, atol=1e-7), (new, expected)
    # dropped entries of both are exactly zero, kept ones rescaled by 1/p
    assert torch.equal(dare(tau, p, torch.Generator().manual_seed(seed)) == 0, ~keep_tau)


def test_one_onties_step_matches_hand_computation():
    theta0 = torch.zeros(8)
    tau = torch.tensor([0.05, -0.3, 0.2, -0.1, 0.01, -0.95, 0.0, 0.25])
    grad = torch.tensor([1.0, 2.0, -0.5, 0.1, -3.0, -2.5, 0.7, 1.5])
    lr, eps, alpha = 1.0, 0.01, 0.25
    new, opt = one_step("onties", theta0, tau, grad, reserve_p=0.5, alpha=alpha, lr=lr, eps=eps)
    # top half of tau by magnitude: 0.95, 0.3, 0.25, 0.2
    assert torch.equal(opt.state[next(iter(opt.state))]["tau"], torch.tensor([0, -0.3, 0.2, 0, 0, -0.95, 0, 0.25]))
    delta = first_adam_step(grad, lr, eps)  # -g / (|g| + 0.316): |D| ranks 3.0, 2.5, 2.0, 1.5 first
    delta_top = delta * torch.tensor([0, 1, 0, 0, 1, 1, 0, 1.0])
    # Sign election on tau~ + D~: entry 5 (-0.95 + 0.888) keeps tau and drops D; entry 7 (0.25 - 0.826)
    # keeps D and drops tau; entry 1 agrees (both kept); entries 2 (tau only) and 4 (D only) are alone.
    tau_kept = torch.tensor([0, -0.3, 0.2, 0, 0, -0.95, 0, 0])
    delta_kept = delta_top * torch.tensor([0, 1, 0, 0, 1, 0, 0, 1.0])
    expected = theta0 + alpha * tau_kept + (1 - alpha) * delta_kept
    assert torch.allclose(new, expected, atol=1e-7), (new, expected)
    assert new[5] == alpha * -0.95 and new[7] == pytest.approx((1 - alpha) * delta[7].item())


def test_pure_pieces():
    assert torch.equal(top_magnitude(torch.tensor([1.0, -3.0, 2.0]), 0.5), torch.tensor([0.0, -3.0, 0.0]))
    assert torch.equal(top_magnitude(torch.tensor([1.0, -3.0]), 0.4), torch.tensor([1.0, -3.0]))  # p * n < 1: all kept
    t, d = ties_consensus(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([-2.0, -1.0, -0.5]))
    assert torch.equal(t, torch.tensor([0.0, -1.0, 0.5])) and torch.equal(
        d, torch.tensor([-2.0, -1.0, 0.0])
    )  # 0 elects +


def test_parameters_without_task_vector_take_plain_adam_steps_and_state_round_trips():
    a, b = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(3))
    opt = OnlineMergingAdamW([a, b], [(a, torch.full((6,), 0.1))], mode="ondare", reserve_p=0.5, alpha=0.0, lr=LR)
    grad_a, grad_b = torch.tensor([1.0, -1, 2, -2, 0.5, 3]), torch.tensor([0.5, -1.0, 2.0])
    a.grad, b.grad = grad_a.clone(), grad_b.clone()
    opt.step()
    assert torch.allclose(b.detach(), 1 + first_adam_step(grad_b, LR, 1e-8))
    # a resumed optimizer (state_dict -> load_state_dict) draws the same next DARE mask
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it (state_dict shares the tensors)
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    other = OnlineMergingAdamW(
        [a2, b2], [(a2, torch.zeros(6))], mode="ondare", reserve_p=0.5, alpha=0.0, lr=LR, seed=99
    )
    other.load_state_dict(saved)
    for p, q in ((a, a2), (b, b2)):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    other.step()
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("dpo", ["--optimizer_merge", "ondre"], "unknown optimizer_merge 'ondre' (did you mean 'ondare'?)"),
        ("dpo", ["--optimizer_merge", "onties"], "optimizer_merge 'onties' needs 'merge_base'"),
        (
            "dpo",
            ["--optimizer_merge", "ondare", "--merge_base", "b", "--use_lora", "true"],
            "does not work with use_lora",
        ),
        (
            "dpo",
            ["--optimizer_merge", "ondare", "--merge_base", "b", "--merge_reserve_p", "0"],
            "'merge_reserve_p' must be in (0, 1]",
        ),
        (
            "rlhf",
            ["--reward", "rule:arithmetic", "--optimizer", "online_dpo", "--optimizer_merge", "ondare"],
            "optimizer_merge 'ondare' needs 'merge_base'",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, command, flags, message):
    assert main([command, "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def changed_fraction(after: dict, before: dict, key: str) -> float:
    return (after[key] != before[key]).float().mean().item()


def test_dpo_with_onties_trains_sparse_merged_updates(sft_model, tiny_model, demo_data, tmp_path):
    """A short `align dpo` from the demo SFT model, its task vector taken against the tiny base it
    was trained from. OnTIES with p = 0.01 moves at most ~1% of each tensor's entries per step (the
    update's top 1%, plus tau~'s top 1% times alpha), where AdamW moves them all."""
    head = tmp_path / "pairs.jsonl"
    head.write_text("".join((demo_data / "pairs.jsonl").read_text().splitlines(keepends=True)[:64]))
    out = tmp_path / "dpo"
    steps = 3
    code = main(
        [
            "dpo",
            "--model_name_or_path",
            str(sft_model),
            "--dataset",
            str(head),
            "--output_dir",
            str(out),
            "--ref_cache_dir",
            str(tmp_path / "cache"),
            "--max_steps",
            str(steps),
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
            "--max_length",
            "64",
            "--learning_rate",
            "5e-4",
            "--optimizer_merge",
            "onties",
            "--merge_base",
            str(tiny_model),
            "--merge_reserve_p",
            "0.01",
        ]
    )
    assert code == 0
    record = json.loads((out / "stage.json").read_text())
    s = record["summary"]
    assert record["config"]["optimizer_merge"] == "onties" and s["global_step"] == steps
    assert math.isfinite(s["final_loss"]) and math.isfinite(s["train_loss"])
    after, before = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(sft_model / "model.safetensors")),
    )
    fraction = changed_fraction(after, before, "model.layers.0.self_attn.q_proj.weight")
    assert 0 < fraction <= steps * 0.02 + 1e-3, fraction  # measured 0.037 (AdamW: all entries)


def test_rlhf_online_dpo_step_with_ondare(tiny_model, tmp_path):
    """One online-DPO update (align rlhf's optimizer, no engine needed) through OnDARE."""
    from align.core.config import parse_config
    from align.rl.optimizers import get_optimizer
    from align.rl.rollout import build_rollouts, token_logprobs
    from align.stages.rlhf import RLHFConfig
    from align.tasks.tiny import make_tiny_model
    from align.training.models import load_causal_lm

    sft = make_tiny_model(tmp_path / "sft", seed=1)  # stands in for an SFT model of the same architecture
    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            str(sft),
            "--dataset",
            "d",
            "--output_dir",
            "o",
            "--reward",
            "rule:arithmetic",
            "--optimizer",
            "online_dpo",
            "--learning_rate",
            "1e-2",
            "--optimizer_merge",
            "ondare",
            "--merge_base",
            str(tiny_model),
            "--merge_reserve_p",
            "0.1",
        ],
    )
    policy = load_causal_lm(cfg)
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    frozen = load_causal_lm(cfg)

    def ref(ids, mask):
        with torch.no_grad():
            return token_logprobs(frozen, ids, mask)[0]

    opt = get_optimizer("online_dpo")(cfg, policy, ref)
    assert isinstance(opt.optimizer, OnlineMergingAdamW)
    rollouts = build_rollouts(
        [[5, 6, 7], [8, 9]],
        [[[10, 11], [12]], [[13, 14, 15], [16]]],
        [[False, False], [False, True]],
        [1.0, 0.0, 0.0, 1.0],
        pad_id=0,
    )
    stats = opt.update(rollouts)
    assert stats["pairs"] == 2.0 and math.isfinite(stats["loss"])
    key = "model.layers.0.mlp.up_proj.weight"
    fraction = changed_fraction(policy.state_dict(), before, key)
    assert 0.05 < fraction < 0.3, (
        fraction
    )  # DARE keeps ~10% of D; tau~'s ~10% (times alpha) moves others (measured 0.19)


@pytest.mark.slow
def test_dpo_resume_continues_the_same_merged_run(tiny_model, demo_data, tmp_path, crash_at_step_3):
    """Crash after the step-2 checkpoint, resume: the same weights as an uninterrupted run, so the
    checkpoint restored the sparsified tau, the Adam moments and the DARE generator."""
    from align.core.config import parse_config
    from align.stages.dpo import DPOConfig, run_dpo
    from align.tasks.tiny import make_tiny_model

    sft = make_tiny_model(tmp_path / "sft", seed=1)  # the "SFT" policy; tiny_model is its "base"
    head = tmp_path / "pairs.jsonl"
    head.write_text("".join((demo_data / "pairs.jsonl").read_text().splitlines(keepends=True)[:32]))

    def flags(out):
        return list(
            map(
                str,
                [
                    "--model_name_or_path",
                    sft,
                    "--dataset",
                    head,
                    "--output_dir",
                    out,
                    "--ref_cache_dir",
                    tmp_path / "cache",
                    "--max_steps",
                    4,
                    "--save_steps",
                    2,
                    "--per_device_train_batch_size",
                    8,
                    "--max_length",
                    64,
                    "--learning_rate",
                    "1e-3",
                    "--optimizer_merge",
                    "ondare",
                    "--merge_base",
                    tiny_model,
                    "--merge_reserve_p",
                    "0.3",
                    "--merge_alpha",
                    "0.01",
                ],
            )
        )

    run_dpo(parse_config(DPOConfig, flags(tmp_path / "straight")))
    with crash_at_step_3():
        run_dpo(parse_config(DPOConfig, flags(tmp_path / "resumed")))
    record = run_dpo(parse_config(DPOConfig, [*flags(tmp_path / "resumed"), "--resume"]))
    assert record["summary"]["resumed_from_step"] == 2 and record["summary"]["global_step"] == 4
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not torch.equal(
        straight["model.layers.0.mlp.up_proj.weight"],
        load_file(str(sft / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"],
    )
