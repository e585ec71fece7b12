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


def test_numeric_answer_reads_answers_written_in_sentences():
    rule = get_rule("numeric_answer")
    assert rule("What is 23+45?", "The answer is 68.", answer="68") == 1.0
    assert rule("q", "23 + 45 = 68", answer="68") == 1.0  # the last number, not the first
    assert rule("q", "So the sum is \\boxed{68}. Check: 60 + 8.", answer="68") == 1.0  # boxed wins over later numbers
    assert rule("q", "23 plus 45 makes 68\n#### 68", answer=68) == 1.0
    assert rule("q", "#### 68\nthat took 3 steps", answer="68") == 1.0  # #### wins over later numbers
    assert rule("q", "68.0", answer="68") == 1.0
    assert rule("q", "It is -5.", answer="-5") == 1.0
    assert rule("q", "The total is 1,234 apples.", answer="1234") == 1.0
    assert rule("q", "The total is 1234.", answer="1,234") == 1.0
    assert rule("q", "0.5", answer=".5") == 1.0
    assert rule("q", "sixty-eight", answer="68") == 0.0  # numbers in words are not read
    assert rule("q", "The answer is 67.", answer="68") == 0.0
    assert rule("q", "68.5", answer="68") == 0.0
    assert rule("q", "I don't know.", answer="68") == 0.0
    assert rule("q", "", answer="68") == 0.0
    assert rule("q", "\\boxed{67} but maybe 68", answer="68") == 0.0


def test_final_number_marks_and_separators():
    from reward.rules import final_number

    assert final_number("a 1 b 2 c 3") == 3.0
    assert final_number("\\boxed{12} and \\boxed{1,000}") == 1000.0
    assert final_number("#### 7\nlater #### 8") == 8.0
    assert final_number("no digits") is None


def test_numeric_answer_needs_a_numeric_answer_column():
    rule = get_rule("numeric_answer")
    with pytest.raises(DataError, match="'answer' column 'sixty-eight' holds no number"):
        rule("q", "68", answer="sixty-eight")
    with pytest.raises(DataError, match="needs an 'answer' column"):
        rule("q", "68")
