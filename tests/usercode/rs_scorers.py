"""User-code scorers (``--reward rs_scorers:NAME``) loaded by the rs tests (tests/usercode/ is on their path)."""

from __future__ import annotations

import time

from reward.rules import exact_match as arithmetic  # the rule rule:arithmetic names

NAN_PROMPT = "add_05_07"


def nan_for_one(prompt: str, response: str, **columns) -> float:
    """NaN for one prompt id (a buggy scorer), the arithmetic rule elsewhere."""
    return float("nan") if columns.get("prompt_id") == NAN_PROMPT else arithmetic(prompt, response, **columns)


def slow_arithmetic(prompt: str, response: str, **columns) -> float:
    """The arithmetic rule, 5 ms per call: a shard takes long enough to be killed mid-run."""
    time.sleep(0.005)
    return arithmetic(prompt, response, **columns)
