"""reward.scorers and reward.model: rules, committees, NaN checks and the reward-model scorer."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from align.core.errors import ConfigError, DataError, ModelError
from reward.model import RewardModel, encode, length_batches
from reward.rules import get_rule
from reward.scorers import COMBINERS, build_scorer, check_finite, z_normalize

# ---------------------------------------------------------------------------------------- rules


def test_regex_rule_reads_the_pattern_column():
    rule = get_rule("regex")
    assert rule("q", "The answer is 42.", pattern=r"\b42\b") == 1.0
    assert rule("q", "The answer is 420.", pattern=r"\b42\b") == 0.0
    assert rule("q", "42", pattern=r"^\d+$") == 1.0 and rule("q", "42 apples", pattern=r"^\d+$") == 0.0
    with pytest.raises(
        DataError, match=r"rule 'regex' needs a 'pattern' column with a regular expression \(the row has: answer\)"
    ):
        rule("q", "42", answer="42")
    with pytest.raises(DataError, match=r"rule 'regex': invalid pattern '\(' .*fix the row's 'pattern' column"):
        rule("q", "42", pattern="(")


def test_length_penalty():
    rule = get_rule("length_penalty")
    assert rule("q", "abcd", max_chars=4) == 0.0
    assert rule("q", "abcdef", max_chars=4) == -0.5  # 2 characters over 4
    assert rule("q", "x" * 1500) == -0.5  # default max_chars 1000
    assert build_scorer("rule:length_penalty").score(["q"], ["x" * 3000], [{}]) == [-2.0]


# ------------------------------------------------------------------------------------ committees

RESPONSES = ["yes", "no", "maybe"]
ROWS = [{"answer": "yes", "max_chars": 2, "prompt_id": f"p{i}"} for i in range(3)]
# exact_match: [1, 0, 0]; length_penalty with max_chars 2: [-(3-2)/2, 0, -(5-2)/2] = [-0.5, 0, -1.5]
SPECS = ["rule:exact_match", "rule:length_penalty"]


def committee(**kwargs) -> list[float]:
    return build_scorer(SPECS, **kwargs).score(["q"] * 3, RESPONSES, ROWS)


def test_committee_combines_as_documented():
    assert committee(weights=[2.0, 1.0]) == pytest.approx([2 * 1 - 0.5, 0.0, -1.5])
    assert committee() == pytest.approx([0.25, 0.0, -0.75])  # default weights 1/2 each = the mean
    assert committee(combine="mean") == pytest.approx([0.25, 0.0, -0.75])
    assert committee(combine="min") == pytest.approx([-0.5, 0.0, -1.5])
    # z-normalized: exact_match (1, 0, 0) -> (sqrt 2, -1/sqrt 2, -1/sqrt 2); length (-1/2, 0, -3/2):
    # mean -2/3, std sqrt(7/18) -> (1/6, 2/3, -5/6) / sqrt(7/18); then the mean of the two
    s = math.sqrt(7 / 18)
    expected = [
        (math.sqrt(2) + 1 / 6 / s) / 2,
        (-1 / math.sqrt(2) + 2 / 3 / s) / 2,
        (-1 / math.sqrt(2) - 5 / 6 / s) / 2,
    ]
    assert committee(normalize=True) == pytest.approx(expected)
    assert committee(normalize=True) == pytest.approx([0.840737, 0.180969, -1.021707], abs=1e-6)
    assert build_scorer(SPECS, weights=[2.0, 1.0]).name == "weighted(rule:exact_match*2, rule:length_penalty*1)"
    assert z_normalize([3.0, 3.0]) == [0.0, 0.0]


def test_single_spec_is_the_plain_scorer():
    scorer = build_scorer("rule:arithmetic")
    assert scorer.name == "rule:arithmetic"
    assert scorer.score(["1+1="], ["2"], [{"answer": "2"}]) == [1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"combine": "mini"}, f"unknown reward combine 'mini' (did you mean 'min'?); valid: {', '.join(COMBINERS)}"),
        (
            {"weights": [1.0]},
            "1 reward weights for 2 scorers (rule:exact_match, rule:length_penalty); give one weight per scorer",
        ),
        (
            {"weights": [1.0, 1.0], "combine": "min"},
            "reward weights only apply to combine 'weighted', not 'min'; drop the weights or use weighted",
        ),
    ],
)
def test_committee_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        build_scorer(SPECS, **kwargs)
    assert str(err.value) == message


def test_nan_score_names_the_member_and_prompt(monkeypatch):
    module = types.ModuleType("user_rewards")
    module.flaky = lambda prompt, response, **row: float("nan") if response == "no" else 1.0
    monkeypatch.setitem(sys.modules, "user_rewards", module)
    with pytest.raises(DataError, match=r"scorer user_rewards:flaky returned nan for prompt p1; fix the scorer"):
        build_scorer(["rule:exact_match", "user_rewards:flaky"]).score(["q"] * 3, RESPONSES, ROWS)
    scores = build_scorer("user_rewards:flaky").score(["q"] * 3, RESPONSES, ROWS)
    with pytest.raises(DataError, match=r"returned nan for prompt p1"):
        check_finite(scores, [r["prompt_id"] for r in ROWS], "user_rewards:flaky")
    with pytest.raises(DataError, match=r"returned inf for prompt 7"):
        check_finite([1.0, math.inf], [3, 7], "x")


# --------------------------------------------------------------------------------- reward models


def make_rm(source: Path, out: Path) -> Path:
    """A sequence-classification reward model (fresh random head) from a tiny causal LM folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_rm(tiny_model, tmp_path_factory) -> Path:
    return make_rm(tiny_model, tmp_path_factory.mktemp("llama_rm"))


@pytest.fixture(scope="module")
def bpe_policy(tmp_path_factory) -> Path:
    from align.tasks.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bpe") / "tiny", arch="qwen2", tokenizer="bpe", seed=1)


def test_length_batches():
    assert length_batches([3, 9, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_batches([3, 9, 1, 7, 5], 2, sort=False) == [[0, 1], [2, 3], [4]]


def test_batched_by_length_equals_one_at_a_time(llama_rm):
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (12, 34), (99, 99), (5, 60), (7, 7), (45, 3)]]
    responses = ["3", "46 is the sum of these two numbers", "198", "", "14 " * 10, "48"]
    rows = [{} for _ in prompts]
    one = RewardModel.from_pretrained(llama_rm, batch_size=1).score(prompts, responses, rows)
    batched = build_scorer(f"model:{llama_rm}")
    assert batched.name == f"model:{llama_rm}" and batched.batch_size == 32
    assert batched.score(prompts, responses, rows) == pytest.approx(one, abs=1e-5)
    naive = RewardModel.from_pretrained(llama_rm, batch_size=4, sort_by_length=False)
    assert naive.score(prompts, responses, rows) == pytest.approx(one, abs=1e-5)
    assert len(set(round(s, 6) for s in one)) == len(one)  # the head is not a constant
    # the row's own prompt messages (a system prompt) are what gets scored when present
    system = [{"role": "system", "content": "Add."}, {"role": "user", "content": prompts[0]}]
    assert batched.score(prompts[:1], responses[:1], [{"prompt": system}]) != pytest.approx(one[:1])


def test_model_spec_errors(tiny_model, tmp_path):
    with pytest.raises(
        ModelError, match=r"is not a reward model \(architectures: LlamaForCausalLM\); train one with `align rm`"
    ):
        build_scorer(f"model:{tiny_model}")
    with pytest.raises(ModelError, match=r"reward model not found: .*nope has no config.json"):
        build_scorer(f"model:{tmp_path / 'nope'}")


def test_reward_model_scores_another_tokenizers_outputs(tiny_model, bpe_policy, tmp_path):
    """A char-level policy's generations, scored by a BPE reward model (and the other way round):
    the scorer sees text and re-tokenizes it with its own tokenizer and template."""
    from sampling.base import SamplingParams
    from sampling.hf import TransformersEngine

    prompts = [[{"role": "user", "content": p}] for p in ("12+34=", "7+8=", "50+50=")]
    for policy, rm_source in ((tiny_model, bpe_policy), (bpe_policy, tiny_model)):
        engine = TransformersEngine.from_pretrained(str(policy))
        outputs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=6))
        texts = [c[0].text for c in outputs]
        rm = RewardModel.from_pretrained(make_rm(rm_source, tmp_path / f"rm_{rm_source.parent.name}"))
        policy_ids = [c[0].token_ids for c in outputs]
        rm_ids = [rm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert policy_ids != rm_ids  # different vocabularies: ids cannot be shared
        scores = rm.score([p[0]["content"] for p in prompts], texts, [{}] * 3)
        assert all(math.isfinite(s) for s in scores)
        # the same number as a forward pass over the RM's own rendering of that text
        for prompt, text, score in zip(prompts, texts, scores):
            ids = encode(rm.tokenizer, prompt, [{"role": "assistant", "content": text}], 1024)
            if rm_source == bpe_policy:  # byte-level BPE renders any text losslessly
                assert rm.tokenizer.decode(ids).endswith(text + "<|end|>")
            with torch.no_grad():
                direct = rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert score == pytest.approx(direct, abs=1e-5)


# Multi-turn prompts with a system prompt: what `align rm` trains on and what scoring must render.
CHATS = [
    [
        {"role": "system", "content": "Answer with the sum only."},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "12+30="},
    ],
    [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "5+5="}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "7+8="},
    ],
]


def test_rs_scores_the_whole_conversation_with_a_reward_model(llama_rm, tiny_model, tmp_path, capsys):
    """`align rs --reward model:...` gives each candidate the reward the model computes on the
    full chat (system prompt and earlier turns), not on the last user turn alone."""
    import json

    from align.cli import main

    from conftest import read_jsonl

    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": c, "prompt_id": f"c{i}", "answer": "0"}) + "\n" for i, c in enumerate(CHATS))
    )
    out = tmp_path / "rs"
    code = main(
        [
            "rs",
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--reward",
            f"model:{llama_rm}",
            "--engine",
            "transformers",
            "--num_samples",
            "3",
            "--max_tokens",
            "5",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table = read_jsonl(out / "candidates.jsonl")
    assert len(table) == 9
    chats = {f"c{i}": c for i, c in enumerate(CHATS)}
    rm = RewardModel.from_pretrained(llama_rm)
    answers = [[{"role": "assistant", "content": t["text"]}] for t in table]
    full = rm.score_messages([chats[t["prompt_id"]] for t in table], answers)
    last_turn = rm.score_messages([[chats[t["prompt_id"]][-1]] for t in table], answers)
    assert [t["reward"] for t in table] == pytest.approx(full, abs=1e-5)
    assert all(abs(f - s) > 1e-4 for f, s in zip(full, last_turn))  # the context changes the reward
