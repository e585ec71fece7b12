"""align.tasks.demo: the two-digit addition datasets."""

from __future__ import annotations

import json

import pytest

from align.core.errors import ConfigError, DataError
from align.tasks.demo import DEMO_PROMPT_RE, answer_of, write_demo_data, wrong_answer

FILES = ["sft", "prompts", "test", "pairs"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = write_demo_data(tmp_path_factory.mktemp("demo"), seed=0)
    return paths, {name: _rows(paths[name]) for name in FILES}


def _user_text(prompt):
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    assert DEMO_PROMPT_RE.match(prompt[0]["content"]), prompt
    return prompt[0]["content"]


def _correct(text):
    a, b = text[:-1].split("+")
    return str(int(a) + int(b))


def test_files_and_line_counts(demo):
    paths, rows = demo
    assert sorted(paths) == sorted(FILES)
    assert {name: len(rows[name]) for name in FILES} == {
        "sft": 9800,
        "prompts": 1000,
        "test": 200,
        "pairs": 2000,
    }
    assert all(paths[n].name == f"{n}.jsonl" for n in FILES)
    assert not list(paths["sft"].parent.glob("*.tmp"))  # atomic writes leave no temp files


def test_shapes_and_answers(demo):
    _, rows = demo
    for row in rows["sft"]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == _correct(_user_text([user]))
    for name in ["prompts", "test"]:
        for row in rows[name]:
            assert set(row) == {"prompt", "answer", "prompt_id"}
            assert row["answer"] == _correct(_user_text(row["prompt"]))
        ids = [r["prompt_id"] for r in rows[name]]
        assert len(set(ids)) == len(ids)
    assert rows["prompts"][0]["prompt_id"].startswith("add_")
    # Every training prompt is distinct in sft; all 100 x 100 pairs are covered by sft + test.
    sft_texts = [r["messages"][0]["content"] for r in rows["sft"]]
    test_texts = [_user_text(r["prompt"]) for r in rows["test"]]
    assert len(set(sft_texts)) == 9800
    assert len(set(sft_texts) | set(test_texts)) == 10_000


def test_test_set_is_held_out_of_every_training_file(demo):
    _, rows = demo
    test = {_user_text(r["prompt"]) for r in rows["test"]}
    assert len(test) == 200
    train = {r["messages"][0]["content"] for r in rows["sft"]}
    train |= {_user_text(r["prompt"]) for r in rows["prompts"]}
    train |= {_user_text(r["prompt"]) for r in rows["pairs"]}
    assert not test & train


def test_pairs_chosen_correct_rejected_plausible(demo):
    _, rows = demo
    kinds = set()
    for row in rows["pairs"]:
        text = _user_text(row["prompt"])
        (chosen,), (rejected,) = row["chosen"], row["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert chosen["content"] == _correct(text)
        assert rejected["content"] != chosen["content"]
        assert rejected["content"].isdigit()  # non-negative integer
        kinds.add(abs(int(rejected["content"]) - int(chosen["content"])))
    assert {1, 10} <= kinds and len(kinds) > 3  # off by 1, by 10, and digit swaps / carries


def test_wrong_answer_is_never_right_or_negative():
    import random

    rng = random.Random(0)
    for a in range(100):
        for b in range(100):
            w = wrong_answer(a, b, rng)
            assert w.isdigit() and int(w) != a + b
    assert wrong_answer(0, 0, random.Random(0)) in {"1", "10"}


def test_deterministic_for_a_seed(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=1, num_test=50, num_prompts=100, num_pairs=100)
    b = write_demo_data(tmp_path / "b", seed=1, num_test=50, num_prompts=100, num_pairs=100)
    c = write_demo_data(tmp_path / "c", seed=2, num_test=50, num_prompts=100, num_pairs=100)
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert a[name].read_bytes() != c[name].read_bytes(), name


def test_pairs_cycle_when_more_are_asked_than_training_prompts(tmp_path):
    paths = write_demo_data(tmp_path, num_test=9990, num_prompts=10, num_pairs=25)
    rows = _rows(paths["pairs"])
    assert len(rows) == 25
    assert len({_user_text(r["prompt"]) for r in rows}) == 10


def test_bad_counts_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_test must be below 10000"):
        write_demo_data(tmp_path, num_test=10_000)
    with pytest.raises(ConfigError, match=r"num_prompts \(9901\) exceeds the 9900 pairs"):
        write_demo_data(tmp_path, num_test=100, num_prompts=9901)
    with pytest.raises(ConfigError, match="num_pairs must be a non-negative integer"):
        write_demo_data(tmp_path, num_pairs=-1)


def test_answer_of():
    assert answer_of("12+34=") == "46"
    assert answer_of("99+99=") == "198"
    assert answer_of("0+7=") == "7"
    with pytest.raises(DataError, match="not a demo prompt"):
        answer_of("12*34=")


def test_question_style_asks_the_same_held_out_sums_in_words(tmp_path):
    from reward.rules import numeric_answer

    eq = write_demo_data(tmp_path / "eq", num_test=20, num_prompts=10, num_pairs=5)
    q = write_demo_data(tmp_path / "q", num_test=20, num_prompts=10, num_pairs=5, style="question")
    rows_eq = [json.loads(line) for line in eq["test"].read_text().splitlines()]
    rows_q = [json.loads(line) for line in q["test"].read_text().splitlines()]
    assert [r["prompt_id"] for r in rows_q] == [r["prompt_id"] for r in rows_eq]
    assert [r["answer"] for r in rows_q] == [r["answer"] for r in rows_eq]
    for row in rows_q:
        a, b = (int(x) for x in row["prompt_id"].split("_")[1:])
        assert row["prompt"] == [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]
        assert numeric_answer(row["prompt"][0]["content"], f"The answer is {a + b}.", answer=row["answer"]) == 1.0
        assert numeric_answer(row["prompt"][0]["content"], f"{a + b + 1}", answer=row["answer"]) == 0.0


def test_unknown_style_is_one_line_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown prompt style 'questio' \(did you mean 'question'\?\); valid: equation, question"
    ):
        write_demo_data(tmp_path, style="questio")
