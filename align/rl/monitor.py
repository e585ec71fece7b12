"""The over-optimization monitor of online RL: held-out reward, judges and KL as training goes.

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization", figure 1) plot a policy's
score under the proxy reward model it is optimized against and under the gold judge the proxy
imitates, both against the KL divergence from the initial policy: the proxy keeps rising while
the gold peaks and then falls. ``align rlhf --monitor_dataset`` records that picture for the run
at hand: before the first iteration and every ``monitor_every`` iterations (and after the last)
the policy answers the held-out prompts once each at the rollout temperature, the answers are
scored by the training reward (the proxy) and by ``monitor_judges`` (scorers that play no part in
training: the gold, a second judge), and the KL to the reference is estimated on the same answers.
Rows go to ``monitor.jsonl``; ``align report`` plots every score against the KL
(``overoptimization.png``), so a user sees where optimizing the proxy stops helping.

How we depart from Gao et al.: the KL is the mean over held-out prompts of the summed per-token
log-ratio of one sampled answer (an unbiased estimate of KL(pi || pi_ref) at the sampling
temperature, the estimator their figure uses), on a few hundred prompts instead of thousands;
every point samples with the same seeds (common random numbers), so differences between points
come from the policy, not from the draw.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from align.core.config import option
from reward.rules import RULES

MONITOR_FILE = "monitor.jsonl"
MONITOR_ITERATION_KEY = (1 << 20) - 1  # the iteration field of the seed keys: one no rollout batch reaches


@dataclasses.dataclass
class MonitorOptions:
    """The over-optimization monitor's fields of ``align rlhf`` (mixed into its config)."""

    monitor_dataset: str | None = option(
        None,
        "Held-out prompts for the over-optimization monitor: before training, every"
        " monitor_every iterations and at the end, one sampled answer per prompt is"
        " scored by the reward and by monitor_judges, and its KL to the reference"
        " estimated (monitor.jsonl; `align report` plots them against the KL).",
    )
    monitor_judges: list[str] = option(
        [],
        "Scorers the monitor reports beside the reward and that play no part in training"
        " (e.g. the gold judge a reward model imitates, a second judge).",
        names=RULES,
    )
    monitor_every: int = option(5, "Iterations between monitor points.")
    monitor_max_prompts: int | None = option(None, "Monitor only the first N prompts of monitor_dataset.")


def monitor_seed_keys(seed: int, n: int) -> tuple[int, ...]:
    """The seed keys of the monitor's prompts: the same at every point, apart from every rollout's
    (``rollout_seed_keys`` uses iterations below ``MONITOR_ITERATION_KEY``)."""
    return tuple((seed << 40) + (MONITOR_ITERATION_KEY << 20) + i for i in range(n))


def sequence_kl(logp, logp_ref, mask):
    """Per-sequence sampled KL estimate: the sum over response tokens of log pi - log pi_ref, [B]."""
    return ((logp - logp_ref) * mask).sum(dim=1)


def is_monitor_step(step: int, every: int, last: int) -> bool:
    """Points at step 0 (before training), every ``every`` steps, and the last step."""
    return step == 0 or step % every == 0 or step == last


def monitor_point(
    step: int, engine, policy, reference, tokenizer, rows: list[dict], scorer, judges: dict[str, Any], cfg
) -> dict[str, Any]:
    """Sample, score and measure one point of the monitor; returns its row."""
    import torch

    from align.rl.rollout import build_rollouts, token_logprobs
    from align.training.evaluation import score_candidates
    from sampling.base import SamplingParams, encode_prompts

    params = SamplingParams(
        n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seeds=monitor_seed_keys(cfg.seed, len(rows))
    )
    candidates = engine.generate([r["prompt"] for r in rows], params)
    reward = [s[0] for s in score_candidates(scorer, rows, candidates)]
    judged = {spec: [s[0] for s in score_candidates(judge, rows, candidates)] for spec, judge in judges.items()}
    device = next(policy.parameters()).device
    rollouts = build_rollouts(
        encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.system_prompt),
        [[c[0].token_ids] for c in candidates],
        [[c[0].finish_reason == "length"] for c in candidates],
        reward,
        tokenizer.pad_token_id,
        device,
    )
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            logp = token_logprobs(
                policy,
                rollouts.input_ids,
                rollouts.attention_mask,
                batch_size=cfg.forward_batch_size,
                temperature=cfg.temperature,
            )[0]
            logp_ref = reference(rollouts.input_ids, rollouts.attention_mask)
    finally:
        policy.train(was_training)
    kl = sequence_kl(logp, logp_ref, rollouts.mask)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "step": step,
        "kl": kl.mean().item(),
        "reward": mean(reward),
        "judges": {spec: mean(scores) for spec, scores in judged.items()},
        "response_length": mean([len(c[0].token_ids) for c in candidates]),
        "prompts": len(rows),
    }


def overoptimization_series(points: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every monitored score against the KL: the reward (proxy) first, then each judge."""
    series = {"reward (trained on)": [(p["kl"], p["reward"]) for p in points]}
    for spec in points[0]["judges"] if points else {}:
        series[spec] = [(p["kl"], p["judges"][spec]) for p in points]
    return series


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add one monitor row (a line cut by a crash is dropped by ``read_rows``)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path, after_step: int | None = None) -> list[dict[str, Any]]:
    """The monitor's rows (whole lines only), those after ``after_step`` left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if after_step is None or row.get("step", 0) <= after_step:
            rows.append(row)
    return rows


__all__ = [
    "MONITOR_FILE",
    "MonitorOptions",
    "append_row",
    "is_monitor_step",
    "monitor_point",
    "monitor_seed_keys",
    "overoptimization_series",
    "read_rows",
    "sequence_kl",
]
