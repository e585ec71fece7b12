"""Responses cut at max_tokens: the missing-EOS penalty, masking their loss, and the truncated share
that rlhf, rs and eval report."""

from __future__ import annotations

import json

import pytest
import torch

from align.core.config import parse_config
from align.core.errors import ConfigError
from align.rl import estimators as est
from align.rl.optimizers import _sequence_advantage_loss, get_optimizer
from align.rl.rollout import Rollouts, build_rollouts, mask_truncated, penalize_missing_eos, truncation_view
from align.stages.rlhf import RLHFConfig
from sampling.base import Candidate

from conftest import read_jsonl


def _rollouts() -> Rollouts:
    """One prompt, K = 3 responses of 2 tokens; the second one was cut at max_tokens."""
    return build_rollouts([[5, 6]], [[[7, 8], [9, 10], [11, 12]]], [[False, True, False]], [1.0, 0.0, 0.5], pad_id=0)


# ------------------------------------------------------------------------------ pure functions


def test_missing_eos_penalty_is_taken_off_the_truncated_rewards():
    scores, cut = torch.tensor([1.0, 0.0, 0.5, 0.25]), torch.tensor([False, True, True, False])
    assert penalize_missing_eos(scores, cut, 0.5).tolist() == [1.0, -0.5, 0.0, 0.25]
    assert penalize_missing_eos(scores, cut, None) is scores
    assert scores.tolist() == [1.0, 0.0, 0.5, 0.25]  # a new tensor: the scorers' rewards stay as they were


def test_masking_zeroes_the_truncated_rows_and_keeps_every_token_for_statistics():
    r = _rollouts()
    assert r.mask.tolist() == [[0, 1, 1]] * 3 and r.response_mask is r.mask
    masked = mask_truncated(r)
    assert masked.mask.tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 1]]
    assert masked.response_mask.tolist() == [[0, 1, 1]] * 3
    assert masked.scores.tolist() == [1.0, 0.0, 0.5]  # still in the group
    assert r.mask.tolist() == [[0, 1, 1]] * 3  # the input is left as it is

    both = truncation_view(r, mask_rows=True, missing_eos_penalty=0.5)
    assert both.scores.tolist() == [1.0, -0.5, 0.5] and both.mask[1].tolist() == [0, 0, 0]
    plain = truncation_view(r, mask_rows=False, missing_eos_penalty=None)
    assert plain.scores.tolist() == [1.0, 0.0, 0.5] and torch.equal(plain.mask, r.mask) and plain.full_mask is None


def test_a_masked_row_has_zero_gradient_while_its_reward_stays_in_the_group():
    """GRPO's loss at pi_old (ratio 1): d loss / d logp[i, t] = -A_i / (response tokens left in the
    loss). The group's advantages are those of all three rewards (mean 0.5, std sqrt(1/6)):
    +-sqrt(1.5) and 0; the cut response's tokens are out of the loss and out of the token count."""
    r = mask_truncated(_rollouts())
    logp = torch.full(r.mask.shape, -1.0, requires_grad=True)
    r.logp_old = logp.detach()
    adv = est.group_normalized(r.grouped(r.scores)).flatten()
    assert adv.tolist() == pytest.approx([1.5**0.5, -(1.5**0.5), 0.0], abs=1e-3)
    loss, _ = _sequence_advantage_loss(r, logp, adv, clip_eps=0.2)
    loss.backward()
    a = adv[0].item()
    assert logp.grad.flatten().tolist() == pytest.approx([0, -a / 4, -a / 4, 0, 0, 0, 0, 0, 0])


# ------------------------------------------------------------------- the optimizers on a tiny model


def _cfg(tiny_model, tmp_path, name, *extra):
    return parse_config(
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
            "--kl_coef",
            "0.1",
            "--learning_rate",
            "1e-3",
            "--forward_batch_size",
            "64",
            *extra,
        ],
    )


def _loss_gradients(tiny_model, cfg, rollouts):
    """The view the optimizer's loss sees and the loss's gradient with respect to the policy's
    log-probs, at the first step of one update (LoRA's B off zero, so the reference differs)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align.stages.rlhf import make_reference
    from align.training.models import peft_config

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), peft_config(cfg))
    for key, value in policy.named_parameters():
        if "lora_B" in key:
            torch.nn.init.normal_(value, std=0.05)
    opt = get_optimizer(cfg.optimizer)(cfg, policy, make_reference(cfg, policy))
    seen = []
    loss_fn = opt.loss

    def recording_loss(r, logp, entropy, hidden):
        loss, stats = loss_fn(r, logp, entropy, hidden)
        if not seen:
            seen.append((r, torch.autograd.grad(loss, logp, retain_graph=True)[0]))
        return loss, stats

    opt.loss = recording_loss
    opt.update(rollouts)
    return seen[0]


# Token-averaged losses (GRPO, PPO) divide by the response tokens in the loss (masking 3 of 12 rows'
# 27 tokens leaves 20); RLOO and MDLOO average over sequences, whose count does not change.
@pytest.mark.parametrize("name,token_mean", [("grpo", True), ("rloo", False), ("ppo", True), ("mdloo", False)])
def test_masked_rows_carry_no_loss_and_keep_their_place_in_the_baseline(name, token_mean, tiny_model, tmp_path):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 40, (n,), generator=gen).tolist() for n in (3, 5, 4)]
    responses = [[torch.randint(5, 40, (n,), generator=gen).tolist() for n in (2, 3, 2, 2)] for _ in prompts]
    cut = [[False, True, False, False], [False, False, True, False], [True, False, False, False]]
    rollouts = build_rollouts(prompts, responses, cut, torch.rand(12, generator=gen).tolist(), pad_id=0)
    rows = torch.tensor([c for group in cut for c in group])

    plain_view, plain = _loss_gradients(tiny_model, _cfg(tiny_model, tmp_path, name), rollouts)
    view, masked = _loss_gradients(
        tiny_model, _cfg(tiny_model, tmp_path, name, "--mask_truncated_completions", "true"), rollouts
    )
    assert plain_view.full_mask is None and torch.equal(view.full_mask, rollouts.mask)
    assert view.mask[rows].sum() == 0 and torch.equal(view.mask[~rows], rollouts.mask[~rows])
    assert (int(rollouts.mask.sum()), int(view.mask.sum())) == (27, 20)
    assert masked[rows].abs().sum() == 0 and plain[rows].abs().sum() > 0
    # The other rows' gradients are those without masking up to the loss's token count: their
    # advantages (RLOO's and MDLOO's KL-shaped baselines over all K rewards, PPO's whitening) are the same.
    scale = 27 / 20 if token_mean else 1.0
    torch.testing.assert_close(masked[~rows], plain[~rows] * scale, rtol=1e-4, atol=1e-7)
    assert masked[~rows].abs().sum() > 0


def test_missing_eos_penalty_reaches_the_optimizer(tiny_model, tmp_path):
    rollouts = _rollouts()
    view, _ = _loss_gradients(
        tiny_model, _cfg(tiny_model, tmp_path, "grpo", "--missing_eos_penalty", "0.25"), rollouts
    )
    assert view.scores.tolist() == [1.0, -0.25, 0.5] and torch.equal(view.mask, rollouts.mask)
    assert rollouts.scores.tolist() == [1.0, 0.0, 0.5]  # what the metrics report: the scorers' rewards


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--optimizer", "online_dpo", "--mask_truncated_completions", "true"],
            "'mask_truncated_completions' does not apply to optimizer 'online_dpo' (its pairs are whole responses, with no"
            " per-token loss to mask); use --missing_eos_penalty to rank truncated responses lower",
        ),
        (
            ["--missing_eos_penalty", "-1"],
            "'missing_eos_penalty' must be >= 0 (it is subtracted from the reward), got -1.0",
        ),
    ],
)
def test_truncation_options_are_checked(extra, message, tmp_path):
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
                *extra,
            ],
        )
    assert str(err.value) == message


# ------------------------------------------------------------------ the stages report the share


class CuttingEngine:
    """A stand-in engine: K wrong answers per prompt, candidate k of the n-th prompt it has seen
    cut at max_tokens when (n + k) % 3 == 0; records every finish reason it returned."""

    name = "cutting"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.seen = 0
        self.reasons: list[list[str]] = []  # per generate call
        self.loads = 0

    def _candidate(self, cut: bool) -> Candidate:
        text = "x" * (4 if cut else 2)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if self.tokenizer else [7] * len(text)
        if not cut and self.tokenizer:
            ids = ids + [self.tokenizer.eos_token_id]
        return Candidate(text, ids, "length" if cut else "stop")

    def generate(self, prompts, params):
        out = []
        for _ in prompts:
            out.append([self._candidate((self.seen + k) % 3 == 0) for k in range(params.n)])
            self.seen += 1
        self.reasons.append([c.finish_reason for cands in out for c in cands])
        return out

    def load_weights(self, named_tensors):
        self.loads += 1

    def close(self):
        pass


def _share(reasons: list[str]) -> float:
    return sum(r == "length" for r in reasons) / len(reasons)


def test_rs_records_the_share_of_candidates_cut_at_max_tokens(tiny_model, demo_data, tmp_path):
    from align.stages.rs import RSConfig, run_rs

    cfg = parse_config(
        RSConfig,
        [
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / "prompts.jsonl"),
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            str(tmp_path / "rs"),
            "--num_samples",
            "4",
            "--max_prompts",
            "5",
            "--shard_size",
            "2",
            "--select",
            "all",
        ],
    )
    summary = run_rs(cfg, engine=CuttingEngine())["summary"]
    candidates = read_jsonl(tmp_path / "rs" / "candidates.jsonl")
    reasons = [c["finish_reason"] for c in candidates]
    assert len(reasons) == 20 and reasons.count("length") == 7  # (n + k) % 3 == 0 for 7 of the 20 (n, k)
    assert summary["truncated_frac"] == 7 / 20
    rows = read_jsonl(tmp_path / "rs" / "metrics.jsonl")  # shards of 2, 2 and 1 prompts
    assert [r["truncated_frac"] for r in rows] == [_share(reasons[i:j]) for i, j in ((0, 8), (8, 16), (16, 20))]


@pytest.mark.parametrize("k", [1, 3])
def test_eval_records_the_share_of_answers_cut_at_max_tokens(k, tiny_model, demo_data, tmp_path):
    from align.stages.eval import EvalConfig, run_eval

    cfg = parse_config(
        EvalConfig,
        [
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / "test.jsonl"),
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            str(tmp_path / "e"),
            "--max_prompts",
            "7",
            "--num_samples",
            str(k),
            "--temperature",
            "0" if k == 1 else "1",
        ],
    )
    engine = CuttingEngine()
    summary = run_eval(cfg, engine=engine)["summary"]
    results = read_jsonl(tmp_path / "e" / "eval.jsonl")
    written = [r["finish_reason"] for r in results] if k == 1 else [x for r in results for x in r["finish_reasons"]]
    assert written == engine.reasons[0] and len(written) == 7 * k
    assert summary["truncated_frac"] == _share(written) == {1: 3 / 7, 3: 7 / 21}[k]


def test_rlhf_logs_the_truncated_share_per_iteration(tiny_model, demo_data, tmp_path, monkeypatch):
    """Two iterations with a stand-in engine: each metrics row holds the share of that iteration's
    responses cut at max_tokens, stage.json its first and last tenth; the logged reward is the
    scorers' (all answers are wrong: 0), not the one lowered by the penalty."""
    from transformers import AutoTokenizer

    from align.stages.rlhf import run_rlhf

    engine = CuttingEngine(AutoTokenizer.from_pretrained(tiny_model))
    monkeypatch.setattr(RLHFConfig, "build_engine", lambda self, *args, **kwargs: engine)
    out = tmp_path / "rlhf"
    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / "prompts.jsonl"),
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            str(out),
            "--optimizer",
            "grpo",
            "--num_iterations",
            "2",
            "--prompts_per_iteration",
            "4",
            "--num_samples",
            "2",
            "--max_tokens",
            "4",
            "--kv_cache_gb",
            "0.1",
            "--max_model_len",
            "64",
            "--mask_truncated_completions",
            "true",
            "--missing_eos_penalty",
            "0.5",
        ],
    )
    summary = run_rlhf(cfg)["summary"]
    rows = read_jsonl(out / "metrics.jsonl")
    shares = [_share(reasons) for reasons in engine.reasons]
    assert shares == [3 / 8, 2 / 8] and engine.loads == 2
    assert [r["truncated_frac"] for r in rows] == shares
    assert [r["reward_mean"] for r in rows] == [0.0, 0.0]
    assert (summary["truncated_frac_first_10pct"], summary["truncated_frac_last_10pct"]) == (3 / 8, 2 / 8)
    assert json.loads((out / "stage.json").read_text())["summary"]["truncated_frac_last_10pct"] == 2 / 8
