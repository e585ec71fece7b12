"""User scorers loaded by `module:function` in the RL tests (on PYTHONPATH there)."""

import os


def nan_for_one_prompt(prompt: str, response: str, **columns) -> float:
    """A buggy user reward: NaN for the prompt named by ALIGN_TEST_NAN_PROMPT, else exact match."""
    if columns.get("prompt_id") == os.environ.get("ALIGN_TEST_NAN_PROMPT"):
        return float("nan")
    return float(response.strip() == str(columns["answer"]))
