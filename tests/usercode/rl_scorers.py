"""User scorers loaded by `module:function` in the RL tests (on PYTHONPATH there)."""

import os


def nan_for_one_prompt(prompt: str, response: str, **columns) -> float:
    """A buggy user reward: NaN for the prompt named by ALIGN_TEST_NAN_PROMPT, else exact match."""
    if columns.get("prompt_id") == os.environ.get("ALIGN_TEST_NAN_PROMPT"):
        return float("nan")
    return float(response.strip() == str(columns["answer"]))


def digit_share(prompt: str, response: str, **columns) -> float:
    """The share of the response's characters that are digits: a reward an untrained model's
    random answers already vary in, so RL moves it from the first iteration."""
    return sum(ch.isdigit() for ch in response) / max(1, len(response))
