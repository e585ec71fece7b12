"""Estimators, losses and rollout packing of the RL loop, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from align.core.errors import ConfigError
from align.rl import estimators as est
from align.rl import losses as L
from align.rl.optimizers import OPTIMIZERS, PolicyOptimizer, get_optimizer
from align.rl.rollout import build_rollouts
from align.stages.rlhf import batch_indices, policy_weights, run_summary


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_leave_one_out():
    # sum 2: a 1 is compared with mean(1, 0, 0) = 1/3, a 0 with mean(1, 0, 1) = 2/3.
    assert torch.allclose(est.leave_one_out(t([1, 0, 0, 1])), t([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    with pytest.raises(ValueError):
        est.leave_one_out(t([1.0]))


def test_group_normalized():
    assert torch.allclose(est.group_normalized(t([1, 0, 0, 1]), eps=0.0), t([1, -1, -1, 1]))
    assert torch.equal(est.group_normalized(t([2, 2])), t([0, 0]))  # no signal, no NaN


def test_mdloo_rewards():
    out = est.mdloo_rewards(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=0.1)
    assert torch.allclose(out, torch.tensor([0.95, 0.1]))


def test_gae_by_hand():
    # gamma 1, lambda 0.5; deltas 0.1, 0.1, 0.3 -> A = 0.225, 0.25, 0.3.
    adv, ret = est.gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.225, 0.25, 0.3]))
    assert torch.allclose(ret, t([0.725, 0.85, 1.0]))
    # Same response between a prompt position and padding: masked positions do not leak in.
    adv, _ = est.gae(t([0, 0, 1, 5]), t([9, 0.6, 0.7, 9]), t([0, 1, 1, 0]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0, 0.25, 0.3, 0]))


def test_whiten_ignores_masked_entries():
    out = est.whiten(t([1, 3, 100]), t([1, 1, 0]))
    assert torch.allclose(out, t([-1, 1, 0]), atol=1e-6)


def test_kl_k3():
    value = L.kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1)


def test_clipped_surrogate():
    logp_old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), 7.0]])
    mask = t([1, 1, 0])
    loss, stats = L.clipped_surrogate(logp, logp_old, t([1, -1, 1]), mask, clip_eps=0.2)
    # +1 advantage: min(1.5, 1.2) = 1.2; -1 advantage: min(-1.5, -1.2) = -1.5; mean -> (1.2 - 1.5) / 2.
    assert loss.item() == pytest.approx(-(1.2 - 1.5) / 2)
    assert stats["clip_frac"] == 1.0


def test_clipped_value_loss():
    loss, _ = L.clipped_value_loss(t([1.0]), t([0.5]), t([0.0]), t([1.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * max(1.0**2, 0.7**2))


def test_mirror_descent():
    logp = torch.tensor([[math.log(2.0)], [0.0]])
    loss, stats = L.mirror_descent(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1), t=2.0)
    # ratios 2 and 1: -(2*1 + 1*-1)/2 = -0.5; KL terms r log r - (r - 1) = 2 log 2 - 1 and 0,
    # mean (2 log 2 - 1) / 2, weighted 1/t.
    kl = (2 * math.log(2) - 1) / 2
    assert loss.item() == pytest.approx(-0.5 + kl / 2)
    assert stats["kl_old"] == pytest.approx(kl)


def test_mirror_descent_kl_has_no_pull_at_the_previous_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = L.mirror_descent(logp, logp.detach().clone(), torch.tensor([0.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(1, 2))


def test_dpo_sigmoid():
    loss, stats = L.dpo_sigmoid(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert stats["dpo_accuracy"] == 1.0


def test_sequence_clipped_surrogate_clips_one_ratio_per_response():
    # Row 0: two tokens at ratio 1.1 -> sequence ratio 1.21, A = +1, clipped to 1.2 (no gradient);
    # row 1: one token at ratio 0.9, A = -1, inside the clip: -0.9. Loss -(1.2 - 0.9) / 2 = -0.15.
    logp = torch.tensor([[math.log(1.1), math.log(1.1), 5.0], [math.log(0.9), 5.0, 5.0]], requires_grad=True)
    mask = t([1, 1, 0], [1, 0, 0])
    loss, stats = L.sequence_clipped_surrogate(logp, torch.zeros(2, 3), t(1, -1), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.15)
    assert stats == {"clip_frac": 0.5, "ratio_mean": pytest.approx((1.21 + 0.9) / 2)}
    loss.backward()
    # d/dlogp of -(ratio_1 * -1) / 2 on row 1's one token: ratio_1 / 2 = 0.45; nothing elsewhere.
    assert torch.allclose(logp.grad, t([0, 0, 0], [0.45, 0, 0]))


def test_rloo_loss_is_per_sequence():
    """RLOO's loss on two responses of one prompt (scores 1 and 0: leave-one-out advantages +1
    and -1) is the sequence-ratio surrogate above, not the per-token one ((2.2 - 0.9) / 3)."""
    from align.core.config import parse_config
    from align.rl.rollout import Rollouts
    from align.stages.rlhf import RLHFConfig

    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            "o",
            "--optimizer",
            "rloo",
            "--kl_coef",
            "0",
            "--clip_eps",
            "0.2",
        ],
    )
    opt = get_optimizer("rloo")(cfg, torch.nn.Linear(1, 1), None)
    mask = t([1, 1, 0], [1, 0, 0])
    r = Rollouts(
        torch.zeros(2, 4, dtype=torch.long),
        torch.ones(2, 4, dtype=torch.long),
        mask,
        t(1, 0),
        k=2,
        logp_old=torch.zeros(2, 3),
    )
    logp = torch.tensor([[math.log(1.1), math.log(1.1), 5.0], [math.log(0.9), 5.0, 5.0]])
    loss, stats = opt.loss(r, logp, torch.zeros(2, 3), None)
    assert loss.item() == pytest.approx(-0.15)
    assert stats["clip_frac"] == 0.5 and opt.row_local()


def test_warmup_raises_the_learning_rate_linearly_and_resumes_where_it_stood():
    """--warmup_steps 3: optimizer steps at lr/3, 2lr/3, then lr; the schedule's position is in
    the optimizer's state, so a resumed run goes on from the same step."""
    from align.core.config import parse_config
    from align.stages.rlhf import RLHFConfig

    args = ["--model_name_or_path", "m", "--dataset", "d", "--reward", "rule:arithmetic", "--output_dir", "o"]

    def build(*flags: str):
        cfg = parse_config(RLHFConfig, [*args, "--learning_rate", "0.3", *flags])
        return get_optimizer("grpo")(cfg, torch.nn.Linear(1, 1), None)

    def step(opt) -> float:
        lr = opt.optimizer.param_groups[0]["lr"]
        for p in opt.params:
            p.grad = torch.ones_like(p)
        opt._apply_gradients()
        return lr

    opt = build("--warmup_steps", "3")
    assert [step(opt) for _ in range(2)] == pytest.approx([0.1, 0.2])
    resumed = build("--warmup_steps", "3")
    resumed.load_state_dict(opt.state_dict())
    assert [step(resumed) for _ in range(3)] == pytest.approx([0.3, 0.3, 0.3])
    assert [step(build()) for _ in range(1)] == pytest.approx([0.3])  # the default: no warmup
    with pytest.raises(ConfigError, match="'warmup_steps' must be >= 0"):
        parse_config(RLHFConfig, [*args, "--warmup_steps", "-1"]).validate()


def test_chosen_nll_is_the_mean_over_every_chosen_token():
    # Chosen responses of 1 and 3 tokens: pooled (1 + 2 + 2 + 2) / 4 = 1.75 (per pair it would be (1 + 2) / 2).
    logp = t([-1, 9, 9], [-2, -2, -2])
    assert L.chosen_nll(logp, t([1, 0, 0], [1, 1, 1])).item() == pytest.approx(1.75)


def test_online_dpo_nll_term_pools_the_chosen_tokens():
    """Online DPO's NLL stat on two pairs whose chosen responses have 1 and 3 tokens."""
    from align.core.config import parse_config
    from align.rl.rollout import Rollouts
    from align.stages.rlhf import RLHFConfig

    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            "o",
            "--optimizer",
            "online_dpo",
            "--nll_coef",
            "0.2",
        ],
    )
    opt = get_optimizer("online_dpo")(cfg, torch.nn.Linear(1, 1), None)
    # Prompt 0: chosen row 0 (1 token), rejected row 1; prompt 1: rejected row 2, chosen row 3 (3 tokens).
    logp = t([-1, 9, 9], [-4, -4, 9], [-3, -3, -3], [-2, -2, -2])
    mask = t([1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1])
    r = Rollouts(
        torch.zeros(4, 4, dtype=torch.long),
        torch.ones(4, 4, dtype=torch.long),
        mask,
        t(1, 0, 0, 1),
        k=2,
        logp_ref=torch.zeros(4, 3),
    )
    loss, stats = opt.loss(r, logp, torch.zeros(4, 3), None)
    assert stats["pairs"] == 2.0 and stats["nll"] == pytest.approx(1.75)  # rows 0 and 3 are chosen
    dpo, _ = L.dpo_sigmoid(t(-1, -6), t(-8, -3), t(0, 0), t(0, 0), cfg.beta)
    assert loss.item() == pytest.approx(dpo.item() + 0.2 * 1.75)


def test_build_rollouts_masks_response_and_adds_no_token():
    # Response 0 stopped on a stop id that is not the tokenizer's EOS (9 here): nothing is appended
    # to it, nor to the empty response or the truncated ones; every trained token was sampled.
    r = build_rollouts(
        [[5, 6], [7]], [[[1, 8], [2, 3]], [[4, 4], []]], [[False, True], [True, False]], [1.0, 0.0, 0.5, 0.0], pad_id=0
    )
    assert r.input_ids.tolist() == [[5, 6, 1, 8], [5, 6, 2, 3], [7, 4, 4, 0], [7, 0, 0, 0]]
    # mask[t] = 1 when token t+1 is a response token
    assert r.mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert r.truncated.tolist() == [False, True, True, False]
    assert r.k == 2 and r.n_prompts == 2
    assert r.grouped(r.scores).tolist() == [[1.0, 0.0], [0.5, 0.0]]


def test_registry_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_optimizer("mdlo")
    assert str(err.value) == f"unknown optimizer 'mdlo' (did you mean 'mdloo'?); valid: {', '.join(OPTIMIZERS)}"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_is_registered_under_its_name(name):
    cls = get_optimizer(name)
    assert cls.name == name and cls.min_samples >= 1 and cls.loss is not PolicyOptimizer.loss


def test_batch_indices_are_a_pure_function_of_iteration():
    first = [batch_indices(10, 4, it, seed=3) for it in range(5)]
    assert first == [batch_indices(10, 4, it, seed=3) for it in range(5)]
    epoch0 = first[0] + first[1] + first[2][:2]
    assert sorted(epoch0) == list(range(10))  # each row once per epoch
    assert batch_indices(10, 4, 0, seed=4) != first[0]


def test_policy_weights_strip_peft_names(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = {n for n, _ in policy_weights(base)}
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    assert {n for n, _ in policy_weights(peft)} == names


def test_length_grouped_forward_matches_one_pass(tiny_model, monkeypatch):
    """token_logprobs in passes of 2 rows grouped by length (each cut to its longest) gives the
    one-pass log-probs, entropies, hidden states and gradients."""
    from transformers import AutoModelForCausalLM

    from align.rl import rollout
    from align.rl.rollout import token_logprobs

    widths = []
    one_pass = rollout.forward_logprobs
    monkeypatch.setattr(
        rollout, "forward_logprobs", lambda m, ids, *a, **kw: widths.append(ids.shape) or one_pass(m, ids, *a, **kw)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6], [7, 8, 9], [9, 10, 11, 12, 13], [4, 4, 4, 4, 4, 4]]
    r = build_rollouts([s[:1] for s in seqs], [[s[1:]] for s in seqs], [[False]] * 5, [0.0] * 5, pad_id=0)
    results = []
    for batch_size in (None, 2):
        model.zero_grad()
        logp, entropy, hidden = token_logprobs(
            model, r.input_ids, r.attention_mask, with_hidden=True, batch_size=batch_size
        )
        (logp * r.mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logp * r.mask, entropy * r.mask, hidden * r.mask[..., None], grads))
    # one pass of 5 x 8, then passes cut to their longest row: lengths 8,6 | 5,3 | 2
    assert [tuple(w) for w in widths] == [(5, 8), (2, 8), (2, 5), (1, 2)]
    for one, grouped in zip(*results):
        assert one.shape == grouped.shape
        torch.testing.assert_close(grouped, one, atol=1e-5, rtol=1e-5)
    assert results[0][0].abs().sum() > 0


def test_iteration_metrics_pool_every_rank():
    from align.stages.rlhf import iteration_metrics

    parts = [
        {
            "scores": [1.0, 0.0],
            "lengths": [2, 4],
            "truncated": [False, True],
            "stats": {"loss": 1.0, "pairs": 1.0},
            "times": {"generate": 1.0, "score": 0.1, "train": 2.0, "sync": 0.1},
        },
        {
            "scores": [1.0, 1.0],
            "lengths": [3, 3],
            "truncated": [False, False],
            "stats": {"loss": 3.0},
            "times": {"generate": 2.0, "score": 0.1, "train": 1.0, "sync": 0.1},
        },
    ]
    row = iteration_metrics(parts)
    assert row["reward_mean"] == 0.75 and row["samples"] == 4 and row["response_length"] == 3.0
    assert row["truncated_frac"] == 0.25  # one response of the four, on either rank
    assert row["loss"] == 2.0 and row["pairs"] == 1.0  # a stat only one rank reports is its own
    assert row["time_generate"] == 2.0 and row["time_train"] == 2.0  # the slowest rank's
    assert row["samples_per_s"] == pytest.approx(4 / 4.2)


def test_run_summary_first_and_last_tenth_and_sync_share():
    logged = [
        {
            "step": i + 1,
            "reward_mean": float(i),
            "time_generate": 1.0,
            "time_score": 0.5,
            "time_train": 2.0,
            "time_sync": 0.5,
        }
        for i in range(20)
    ]
    logged.append({"step": 20, "eval_mean_reward": 0.9})  # rows without reward_mean are not iterations
    assert run_summary(logged) == {"reward_first_10pct": 0.5, "reward_last_10pct": 18.5, "sync_fraction": 0.125}
    assert run_summary(logged[:3])["reward_first_10pct"] == 0.0  # fewer than 10 iterations: the first one
    for i, row in enumerate(logged[:20]):
        row["truncated_frac"] = 1.0 - i / 20
    summary = run_summary(logged)
    assert (summary["truncated_frac_first_10pct"], summary["truncated_frac_last_10pct"]) == pytest.approx(
        (0.975, 0.075)
    )
