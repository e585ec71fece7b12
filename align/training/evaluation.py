"""Generate with an engine and score with ``--reward``: the glue ``align rs``, ``align eval`` and
the SFT stage's held-out evaluation share.

* ``load_prompts``: prompt rows with a stable, unique ``prompt_id`` (the dataset's own, else a
  hash of the prompt's messages, so it survives reordering the file).
* ``score_candidates``: score K candidates per prompt, each distinct text once, and stop on a
  NaN/inf reward naming the prompt id.
* ``evaluate``: greedy (or sampled) answers on a prompt set -> mean reward (for
  ``rule:arithmetic`` the exact-match accuracy), the share of answers cut at ``max_tokens``
  and per-prompt results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

from align.core.config import option, required
from align.core.errors import DataError
from align.training.data import load_rows
from reward.rules import RULES
from reward.scorers import COMBINERS, build_scorer, check_finite
from sampling.base import Candidate, SamplingParams
from sampling.select import dedupe

RESPONSE_COLUMNS = ("completion", "chosen", "rejected")


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a rule compares against (the whole chat stays in ``rows``)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def columns(row: dict[str, Any]) -> dict[str, Any]:
    """The row a scorer sees with each response: the prompt's messages (``prompt``: system prompt
    and earlier turns included, which a reward model renders whole, as ``align rm`` trained it)
    and the other columns (``answer``, ``prompt_id``, ...); response columns are left out."""
    return {k: v for k, v in row.items() if k not in RESPONSE_COLUMNS}


def _content_id(messages: list[dict]) -> str:
    return "p" + hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def load_prompts(spec: str, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Prompt rows of ``spec`` (first ``max_prompts``), each with a unique string ``prompt_id``."""
    rows = load_rows(spec, "prompt")[:max_prompts]
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        given = row.get("prompt_id")
        pid = str(given) if given is not None else _content_id(row["prompt"])
        if pid in seen:
            if given is not None:
                raise DataError(
                    f"{spec}: prompt_id {pid!r} appears in rows {seen[pid] + 1} and {i + 1}; prompt ids must be unique"
                )
            n = 2
            while f"{pid}-{n}" in seen:
                n += 1
            pid = f"{pid}-{n}"
        seen[pid] = i
        row["prompt_id"] = pid
    return rows


@dataclasses.dataclass
class RewardOptions:
    """The scorer fields of every command that scores text: rs, eval, rlhf (mixed into configs)."""

    reward: list[str] = required(
        "Scorer spec(s): rule:NAME (e.g. rule:arithmetic), model:PATH or module:function; several are combined.",
        names=RULES,
    )
    reward_weights: list[float] | None = option(
        None, "One weight per --reward scorer for reward_combine 'weighted' (default: equal)."
    )
    reward_combine: str = option("weighted", "How several scorers combine (reward.scorers).", choices=COMBINERS)

    def build_scorer(self):
        return build_scorer(self.reward, weights=self.reward_weights, combine=self.reward_combine)


@dataclasses.dataclass
class EvalOptions:
    """Greedy evaluation on held-out prompts after training: sft, dpo (mixed into configs)."""

    eval_dataset: str | None = option(
        None, "Held-out prompts to answer greedily after training (e.g. the demo's test.jsonl)."
    )
    eval_reward: str = option(
        "rule:arithmetic", "Scorer for eval_dataset answers (rule:NAME or module:function).", names=RULES
    )
    eval_max_tokens: int = option(16, "Longest generated answer in evaluation.")


def check_scorer_accepts(scorer, rows: list[dict[str, Any]], dataset: str) -> None:
    """Score the first prompt with an empty response, so a missing column (``answer``) fails
    before any generation, naming the dataset and prompt."""
    row = rows[0]
    try:
        scorer.score([prompt_text(row["prompt"])], [""], [columns(row)])
    except DataError as err:
        raise DataError(f"{dataset} (prompt {row['prompt_id']}): {err}") from None


def truncated_fraction(finish_reasons: list[str]) -> float:
    """The share of responses that hit ``max_tokens`` before a stop token (``finish_reason ==
    "length"``; TRL logs it as ``completions/clipped_ratio``)."""
    return sum(reason == "length" for reason in finish_reasons) / len(finish_reasons)


def score_candidates(scorer, rows: list[dict[str, Any]], candidates: list[list[Candidate]]) -> list[list[float]]:
    """Rewards for every candidate of every prompt; identical texts of a prompt are scored once."""
    dups = [dedupe([c.text for c in cands]) for cands in candidates]
    items = [(p, k) for p, d in enumerate(dups) for k, dup in enumerate(d) if dup is None]
    scores = [
        float(s)
        for s in scorer.score(
            [prompt_text(rows[p]["prompt"]) for p, _ in items],
            [candidates[p][k].text for p, k in items],
            [columns(rows[p]) for p, _ in items],
        )
    ]
    check_finite(scores, [rows[p]["prompt_id"] for p, _ in items], scorer.name)
    first = dict(zip(items, scores))
    return [[first[(p, k if dup is None else dup)] for k, dup in enumerate(d)] for p, d in enumerate(dups)]


def evaluate(
    engine,
    dataset: str,
    reward: list[str] | str,
    max_tokens: int = 32,
    max_samples: int | None = None,
    params: SamplingParams | None = None,
    scorer=None,
    rows: list[dict] | None = None,
) -> dict[str, Any]:
    """Answer every prompt with ``engine`` (greedy unless ``params`` says otherwise), score the answers.

    With K = ``params.n`` > 1 every sample is scored: ``mean_reward`` is over all samples and
    ``best_of_k`` the mean over prompts of the best sample (pass@K for a 0/1 reward). ``rows``
    and ``scorer`` may be given already loaded (and checked).
    """
    if rows is None:
        rows = load_prompts(dataset, max_samples)
    if scorer is None:
        scorer = build_scorer(reward)
        check_scorer_accepts(scorer, rows, dataset)
    params = params or SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens)
    started = time.perf_counter()
    outputs = engine.generate([r["prompt"] for r in rows], params)
    seconds = time.perf_counter() - started
    scores = score_candidates(scorer, rows, outputs)
    results = [
        {
            "prompt_id": row["prompt_id"],
            "prompt": prompt_text(row["prompt"]),
            **(
                {
                    "response": cands[0].text,
                    "reward": s[0],
                    "finish_reason": cands[0].finish_reason,
                    "num_tokens": len(cands[0].token_ids),
                }
                if params.n == 1
                else {
                    "responses": [c.text for c in cands],
                    "rewards": s,
                    "reward": sum(s) / len(s),
                    "finish_reasons": [c.finish_reason for c in cands],
                    "num_tokens_list": [len(c.token_ids) for c in cands],
                }
            ),
        }
        for row, cands, s in zip(rows, outputs, scores)
    ]
    every = [x for s in scores for x in s]
    tokens = sum(len(c.token_ids) for cands in outputs for c in cands)
    return {
        "mean_reward": sum(every) / len(every),
        "best_of_k": sum(max(s) for s in scores) / len(scores),
        "num_prompts": len(rows),
        "num_samples": params.n,
        "truncated_frac": truncated_fraction([c.finish_reason for cands in outputs for c in cands]),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "reward": reward,
        "results": results,
    }
