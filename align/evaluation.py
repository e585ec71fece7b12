"""Score a policy's greedy answers on a prompt set (the figure every stage reports).

For ``rule:arithmetic`` the mean reward is the exact-match accuracy.
"""

from __future__ import annotations

from typing import Any

from align.data import load_rows
from reward.scorers import build_scorer, check_finite
from sampling.base import SamplingParams, render_prompts

PROMPT_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a rule compares against (the whole chat stays in ``rows``)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def evaluate(engine, dataset: str, reward: str, max_tokens: int = 32, max_samples: int | None = None) -> dict[str, Any]:
    """Greedy-generate an answer per prompt with ``engine``, score it, return summary and rows."""
    rows = load_rows(dataset, "prompt")
    if max_samples:
        rows = rows[:max_samples]
    scorer = build_scorer(reward)
    prompts = [r["prompt"] for r in rows]
    outputs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens))
    responses = [cands[0].text for cands in outputs]
    extras = [{k: v for k, v in r.items() if k not in PROMPT_COLUMNS} for r in rows]
    scores = scorer.score([prompt_text(p) for p in prompts], responses, extras)
    ids = [r.get("prompt_id", i) for i, r in enumerate(rows)]
    check_finite(scores, ids, scorer.name)
    results = [
        {"prompt_id": pid, "prompt": prompt_text(p), "response": resp, "reward": s}
        for pid, p, resp, s in zip(ids, prompts, responses, scores)
    ]
    mean = sum(scores) / len(scores)
    return {"mean_reward": mean, "num_prompts": len(rows), "reward": reward, "results": results}


__all__ = ["evaluate", "prompt_text", "render_prompts"]
