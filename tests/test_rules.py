"""reward.rules: the rule registry and the arithmetic rule."""

from __future__ import annotations

import pytest

import reward
from align.errors import ConfigError, DataError
from reward.rules import RULES, get_rule, register_rule


def test_arithmetic_scores_exact_answers():
    rule = get_rule("arithmetic")
    assert rule is reward.arithmetic
    assert rule("12+34=", "46", answer="46") == 1.0
    assert rule("12+34=", "  46\n", answer="46") == 1.0  # surrounding whitespace ignored
    assert rule("12+34=", "46", answer=" 46 ") == 1.0
    assert rule("12+34=", "47", answer="46") == 0.0
    assert rule("12+34=", "4 6", answer="46") == 0.0
    assert rule("12+34=", "", answer="46") == 0.0
    assert rule("12+34=", "46", answer=46, prompt_id="add_12_34") == 1.0  # int column, extras


def test_exact_match():
    rule = get_rule("exact_match")
    assert rule("q", " yes ", answer="yes") == 1.0
    assert rule("q", "Yes", answer="yes") == 0.0


def test_missing_answer_column_is_a_data_error():
    with pytest.raises(DataError, match=r"rule 'arithmetic' needs an 'answer' column.*prompt_id"):
        get_rule("arithmetic")("12+34=", "46", prompt_id="x")


def test_unknown_rule_lists_valid_names_and_suggests():
    with pytest.raises(ConfigError) as err:
        get_rule("arithmetc")
    message = str(err.value)
    assert "unknown reward rule 'arithmetc'" in message
    assert "did you mean 'arithmetic'?" in message
    assert "valid: " in message and "arithmetic" in message.split("valid: ")[1]
    with pytest.raises(ConfigError, match=r"valid: .*arithmetic.*exact_match"):
        get_rule("zzz")


def test_register_rule_and_reject_duplicates(monkeypatch):
    monkeypatch.setattr("reward.rules.RULES", dict(RULES))  # keep the global registry clean
    from reward import rules

    @rules.register_rule("always_one")
    def always_one(prompt, response, **columns):
        return 1.0

    assert rules.get_rule("always_one")("p", "r") == 1.0
    with pytest.raises(ValueError, match="rule 'always_one' is already registered"):
        rules.register_rule("always_one")(lambda prompt, response, **c: 0.0)
    with pytest.raises(ValueError, match="rule 'arithmetic' is already registered"):
        register_rule("arithmetic")(lambda prompt, response, **c: 0.0)
    assert rules.RULES["arithmetic"] is reward.arithmetic
