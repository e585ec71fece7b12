"""reward.rules: the rule registry and the rules."""

from __future__ import annotations

import pytest

import reward
from align.core.errors import ConfigError, DataError
from reward.rules import RULES, get_rule, register_rule


def test_arithmetic_is_exact_match_under_a_second_name():
    rule = get_rule("arithmetic")
    assert rule is get_rule("exact_match") is reward.exact_match
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
    with pytest.raises(DataError, match=r"rule 'exact_match' needs an 'answer' column.*prompt_id"):
        get_rule("arithmetic")("12+34=", "46", prompt_id="x")


def test_unknown_rule_lists_valid_names_and_suggests():
    with pytest.raises(ConfigError) as err:
        get_rule("arithmetc")
    assert str(err.value) == f"unknown reward rule 'arithmetc' (did you mean 'arithmetic'?); valid: {', '.join(RULES)}"
    assert {"exact_match", "arithmetic", "regex", "length_penalty"} <= set(RULES)


def test_register_rule_and_reject_duplicates(monkeypatch):
    monkeypatch.setattr(RULES, "_items", dict(RULES._items))  # keep the global registry clean

    @register_rule("always_one")
    def always_one(prompt, response, **columns):
        return 1.0

    assert get_rule("always_one")("p", "r") == 1.0
    with pytest.raises(ValueError, match="reward rule 'always_one' is already registered"):
        register_rule("always_one")(lambda prompt, response, **c: 0.0)
    with pytest.raises(ValueError, match="reward rule 'arithmetic' is already registered"):
        register_rule("arithmetic")(lambda prompt, response, **c: 0.0)
    assert RULES["arithmetic"] is reward.exact_match


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
