"""Tests for align.training.data: sources, per-format normalization, validation messages, real samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from align.core.errors import AlignError, DataError
from align.training import data
from align.training.data import FORMATS, load_dataset, load_rows, normalize_row, read_records

from conftest import real_data

W = "d.jsonl:1"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def raises(pattern: str):
    """pytest.raises(DataError) matching ``pattern`` literally."""
    return pytest.raises(DataError, match=re.escape(pattern))


# --------------------------------------------------------------------------------------------
# TRL formats
# --------------------------------------------------------------------------------------------


def test_data_error_is_align_error():
    assert issubclass(DataError, AlignError)


def test_messages_sft_splits_final_assistant_turn():
    row = {"messages": [S("be brief"), U("hi"), A("hello"), U("2+2?"), A("4")], "id": 7}
    assert normalize_row(row, "sft", W) == {
        "prompt": [S("be brief"), U("hi"), A("hello"), U("2+2?")],
        "completion": [A("4")],
        "id": 7,
    }


def test_messages_accept_from_value_keys():
    row = {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert normalize_row(row, "sft", W) == {"prompt": [U("hi")], "completion": [A("yo")]}


def test_messages_sft_must_end_with_assistant():
    with raises("d.jsonl:1: 'messages' ends with a user turn; for SFT the last message must be"):
        normalize_row({"messages": [U("hi"), A("yo"), U("again")]}, "sft", W)


def test_messages_sft_needs_a_turn_before_the_completion():
    with raises("d.jsonl:1: empty conversation: 'messages' has no messages before"):
        normalize_row({"messages": [A("yo")]}, "sft", W)


def test_messages_prompt_kind_drops_final_assistant_turn():
    row = {"messages": [U("hi"), A("yo"), U("q"), A("a")]}
    assert normalize_row(row, "prompt", W) == {"prompt": [U("hi"), A("yo"), U("q")]}
    assert normalize_row({"messages": [S("s"), U("q")]}, "prompt", W) == {"prompt": [S("s"), U("q")]}


def test_prompt_completion_strings_are_wrapped():
    row = {"prompt": "2+2?", "completion": "4", "level": 1}
    assert normalize_row(row, "sft", W) == {"prompt": [U("2+2?")], "completion": [A("4")], "level": 1}


def test_prompt_completion_message_lists_are_kept():
    row = {"prompt": [S("s"), U("q")], "completion": [A("a")]}
    assert normalize_row(row, "sft", W) == {"prompt": [S("s"), U("q")], "completion": [A("a")]}


def test_prompt_completion_missing_completion_names_column():
    with raises(
        "d.jsonl:1: missing column 'completion' for prompt/completion (TRL) data "
        "(has: prompt); add 'completion' to every row"
    ):
        normalize_row({"prompt": "q"}, "sft", W)


def test_text_rows_are_rejected_for_sft():
    with raises(
        "d.jsonl:1: plain 'text' rows (language modeling) are not supported for SFT; "
        "convert each row to prompt/completion or messages"
    ):
        normalize_row({"text": "once upon a time"}, "sft", W)


def test_explicit_preference_strings_and_lists():
    row = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 0.5}
    assert normalize_row(row, "preference", W) == {
        "prompt": [U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
        "margin": 0.5,
    }
    row = {"prompt": [S("s"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert normalize_row(row, "preference", W) == {
        "prompt": [S("s"), U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
    }


def test_preference_missing_rejected_names_column():
    with raises(
        "d.jsonl:1: missing column 'rejected' for prompt/chosen/rejected (TRL) data "
        "(has: prompt, chosen); add 'rejected' to every row"
    ):
        normalize_row({"prompt": "q", "chosen": "good"}, "preference", W)


def test_implicit_prompt_takes_shared_prefix():
    row = {
        "chosen": [U("hi"), A("yo"), U("q"), A("good")],
        "rejected": [U("hi"), A("yo"), U("q"), A("bad"), U("?"), A("worse")],
        "prompt_id": "p1",
    }
    assert normalize_row(row, "preference", W) == {
        "prompt": [U("hi"), A("yo"), U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad"), U("?"), A("worse")],
        "prompt_id": "p1",
    }


def test_implicit_prompt_errors():
    with raises("d.jsonl:1: 'chosen' and 'rejected' share no prompt"):
        normalize_row({"chosen": [U("a"), A("x")], "rejected": [U("b"), A("y")]}, "preference", W)
    with raises("d.jsonl:1: 'chosen' has nothing after the prompt it shares"):
        normalize_row({"chosen": [U("a")], "rejected": [U("a"), A("y")]}, "preference", W)
    with raises("d.jsonl:1: 'chosen' and 'rejected' without a 'prompt' must be full conversations"):
        normalize_row({"chosen": "x", "rejected": "y"}, "preference", W)
    with raises("d.jsonl:1: missing column 'rejected' for chosen/rejected with a shared prompt"):
        normalize_row({"chosen": [U("a"), A("x")]}, "preference", W)


def test_prompt_only_string_and_list_keep_extras():
    assert normalize_row({"prompt": "2+2?", "answer": "4"}, "prompt", W) == {"prompt": [U("2+2?")], "answer": "4"}
    assert normalize_row({"prompt": [S("s"), U("q")]}, "prompt", W) == {"prompt": [S("s"), U("q")]}


def test_prompt_kind_drops_other_trl_columns():
    # a stray string "completion" would make TRL read the row as non-conversational
    assert normalize_row({"prompt": "q", "completion": "a", "answer": "a"}, "prompt", W) == {
        "prompt": [U("q")],
        "answer": "a",
    }


def test_null_format_columns_are_dropped():
    # parquet files built from mixed rows hold the union of columns, null where absent
    row = {"prompt": "q", "completion": "a", "messages": None, "instruction": None, "note": None}
    assert normalize_row(row, "sft", W) == {"prompt": [U("q")], "completion": [A("a")], "note": None}


# --------------------------------------------------------------------------------------------
# Alpaca
# --------------------------------------------------------------------------------------------


def test_alpaca_sft_with_and_without_input():
    row = {"instruction": "Sum these.", "input": "2 and 3", "output": "5"}
    assert normalize_row(row, "sft", W) == {"prompt": [U("Sum these.\n2 and 3")], "completion": [A("5")]}
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert normalize_row(row, "sft", W) == {"prompt": [U("Say hi.")], "completion": [A("hi")]}


def test_alpaca_system_and_history():
    row = {
        "instruction": "And 3+3?",
        "output": "6",
        "system": "math tutor",
        "history": [["1+1?", "2"], ["2+2?", "4"]],
        "level": "easy",
    }
    assert normalize_row(row, "sft", W) == {
        "prompt": [S("math tutor"), U("1+1?"), A("2"), U("2+2?"), A("4"), U("And 3+3?")],
        "completion": [A("6")],
        "level": "easy",
    }


def test_alpaca_bad_history_pair():
    with raises("d.jsonl:1: history[0] must be a [user, assistant] pair of strings"):
        normalize_row({"instruction": "x", "output": "y", "history": [["only one"]]}, "sft", W)


def test_alpaca_sft_requires_output():
    with raises("d.jsonl:1: missing column 'output' for instruction/input/output (Alpaca) data"):
        normalize_row({"instruction": "x"}, "sft", W)


def test_alpaca_prompt_output_optional():
    assert normalize_row({"instruction": "Say hi.", "input": "politely"}, "prompt", W) == {
        "prompt": [U("Say hi.\npolitely")]
    }
    assert normalize_row({"instruction": "Say hi.", "output": "hi"}, "prompt", W) == {"prompt": [U("Say hi.")]}


def test_alpaca_preference():
    row = {"instruction": "Pick one.", "input": "a or b", "chosen": "a", "rejected": "b", "system": "judge"}
    assert normalize_row(row, "preference", W) == {
        "prompt": [S("judge"), U("Pick one.\na or b")],
        "chosen": [A("a")],
        "rejected": [A("b")],
    }


def test_alpaca_non_string_instruction():
    with raises("d.jsonl:1: 'instruction' must be a string, got int"):
        normalize_row({"instruction": 3, "output": "y"}, "sft", W)


# --------------------------------------------------------------------------------------------
# ShareGPT
# --------------------------------------------------------------------------------------------


def sg(role, text):
    return {"from": role, "value": text}


def test_sharegpt_sft_maps_roles_and_system():
    row = {
        "conversations": [sg("human", "hi"), sg("gpt", "yo"), sg("user", "q"), sg("assistant", "a")],
        "system": "be kind",
        "id": "x",
    }
    assert normalize_row(row, "sft", W) == {
        "prompt": [S("be kind"), U("hi"), A("yo"), U("q")],
        "completion": [A("a")],
        "id": "x",
    }


def test_sharegpt_system_entry_in_conversations():
    row = {"conversations": [sg("system", "s"), sg("human", "q"), sg("gpt", "a")]}
    assert normalize_row(row, "sft", W) == {"prompt": [S("s"), U("q")], "completion": [A("a")]}


def test_sharegpt_prompt_kind():
    row = {"conversations": [sg("human", "q"), sg("gpt", "a")]}
    assert normalize_row(row, "prompt", W) == {"prompt": [U("q")]}


def test_sharegpt_preference_object_and_list():
    row = {
        "conversations": [sg("system", "s"), sg("human", "q")],
        "chosen": sg("gpt", "good"),
        "rejected": [sg("gpt", "bad")],
    }
    assert normalize_row(row, "preference", W) == {
        "prompt": [S("s"), U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
    }


def test_sharegpt_unknown_role():
    row = {"conversations": [sg("human", "q"), sg("observation", "x"), sg("gpt", "a")]}
    with raises("d.jsonl:1: conversations[1] has unknown from 'observation'; use one of: system, human, gpt"):
        normalize_row(row, "sft", W)
    with raises("unknown from 'function_call'; use one of: system, human, gpt"):
        normalize_row({"conversations": [sg("function_call", "x")]}, "prompt", W)


def test_sharegpt_preference_missing_rejected():
    row = {"conversations": [sg("human", "q")], "chosen": sg("gpt", "good")}
    with raises("d.jsonl:1: missing column 'rejected' for conversations + chosen/rejected (ShareGPT)"):
        normalize_row(row, "preference", W)


# --------------------------------------------------------------------------------------------
# Validation messages
# --------------------------------------------------------------------------------------------


def test_missing_columns_lists_accepted_formats():
    with raises(
        "data/x.jsonl:1: no preference columns found (has: foo, bar); expected one of: "
        "prompt/chosen/rejected (TRL) | chosen/rejected with a shared prompt (TRL implicit prompt) "
        "| conversations + chosen/rejected (ShareGPT) | instruction/input + chosen/rejected (Alpaca)"
    ):
        normalize_row({"foo": 1, "bar": 2}, "preference", "data/x.jsonl:1")
    with raises(
        "x.json row 3: no sft columns found (has: question); expected one of: "
        "messages (TRL conversational) | prompt/completion (TRL) | conversations (ShareGPT) "
        "| instruction/input/output (Alpaca)"
    ):
        normalize_row({"question": "?"}, "sft", "x.json row 3")


def test_formats_describe_every_registered_format():
    assert all(isinstance(v, str) and v for v in FORMATS.values())
    for kind in ("sft", "preference", "prompt"):
        with pytest.raises(DataError) as err:
            normalize_row({"zzz": 1}, kind, W)
        assert "\n" not in str(err.value)
        assert "expected one of: " in str(err.value)


def test_unknown_role_lists_valid_roles():
    with raises("d.jsonl:1: messages[1] has unknown role 'bot'; use one of: system, user, assistant"):
        normalize_row({"messages": [U("q"), {"role": "bot", "content": "a"}]}, "sft", W)


def test_empty_conversation():
    with raises("d.jsonl:1: empty conversation in 'messages'"):
        normalize_row({"messages": []}, "sft", W)
    with raises("d.jsonl:1: empty conversation: 'prompt' is an empty string"):
        normalize_row({"prompt": ""}, "prompt", W)
    with raises("d.jsonl:1: empty conversation in 'prompt'"):
        normalize_row({"prompt": [], "chosen": "a", "rejected": "b"}, "preference", W)


def test_content_must_be_a_string():
    with raises("d.jsonl:1: messages[0].content must be a string, got list"):
        normalize_row({"messages": [{"role": "user", "content": ["x"]}, A("a")]}, "sft", W)
    with raises("d.jsonl:1: conversations[1].value must be a string, got null"):
        normalize_row({"conversations": [sg("human", "q"), sg("gpt", None)]}, "sft", W)


def test_message_without_role():
    with raises("d.jsonl:1: messages[0] has no 'role' (or 'from') key (has: text)"):
        normalize_row({"messages": [{"text": "x"}]}, "sft", W)


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown data kind 'kto'"):
        normalize_row({"prompt": "q"}, "kto", W)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_jsonl_reads_and_locates_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "completion": "a"}) + "\n\n" + json.dumps({"prompt": "q2"}) + "\n", encoding="utf-8"
    )
    assert read_records(str(path)) == [{"prompt": "q", "completion": "a"}, {"prompt": "q2"}]
    with raises(f"{path}:3: missing column 'completion'"):  # blank line 2 is skipped
        load_rows(str(path), "sft")


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q2",\n', encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl:2: invalid JSON \(.*\); each line must be one "
        r"JSON object$",
    ) as err:
        read_records(str(path))
    assert "\n" not in str(err.value)


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q"}\n[1, 2]\n', encoding="utf-8")
    with raises(f"{path}:2: expected a JSON object, got list"):
        read_records(str(path))


def test_json_array_and_row_numbers(tmp_path):
    spec = write_json(tmp_path / "d.json", [{"prompt": "q", "completion": "a"}, {"prompt": "x"}])
    assert read_records(spec)[0] == {"prompt": "q", "completion": "a"}
    with raises(f"{spec} row 2: missing column 'completion'"):
        load_rows(spec, "sft")


def test_json_object_with_rows_under_a_key(tmp_path):
    rows = [{"instruction": "i", "output": "o"}]
    assert read_records(write_json(tmp_path / "a.json", {"version": 1, "data": rows})) == rows
    assert read_records(write_json(tmp_path / "b.json", {"items": rows})) == rows
    split = {"train": rows, "test": [{"instruction": "t", "output": "o"}]}
    assert read_records(write_json(tmp_path / "c.json", split), split="test")[0]["instruction"] == "t"
    with raises("expected a JSON array of row objects, or an object holding one list of rows"):
        read_records(write_json(tmp_path / "d.json", {"a": 1}))


def test_json_file_with_json_lines_content(tmp_path):
    spec = write_jsonl(tmp_path / "d.json", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_rows(spec, "prompt") == [{"prompt": [U("a")]}, {"prompt": [U("b")]}]


def test_json_invalid(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a"},\n {"prompt": }]', encoding="utf-8")
    with raises(f"{path}:2: invalid JSON (Expecting value, column 13)"):
        read_records(str(path))


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"messages": [U("q"), A("a")], "id": 1},
                {"messages": [S("s"), U("q2"), A("a2")], "id": 2},
            ]
        ),
        path,
    )
    assert load_rows(str(path), "sft") == [
        {"prompt": [U("q")], "completion": [A("a")], "id": 1},
        {"prompt": [S("s"), U("q2")], "completion": [A("a2")], "id": 2},
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    expected = [{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]
    assert load_rows(str(tmp_path / "ds"), "preference") == expected

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list([{"prompt": "t"}])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), "preference") == expected
    assert load_rows(str(tmp_path / "dd"), "prompt", split="test") == [{"prompt": [U("t")]}]
    with raises(f"{tmp_path / 'dd'}: no split 'validation' in this saved DatasetDict (has: train, test)"):
        read_records(str(tmp_path / "dd"), split="validation")


def test_folder_that_is_not_a_dataset(tmp_path):
    with raises(f"{tmp_path}: not a dataset folder written by datasets' save_to_disk"):
        read_records(str(tmp_path))


def test_not_found_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with raises(f"dataset not found: {missing}; give an existing .jsonl, .json or .parquet file"):
        read_records(str(missing))
    with raises("dataset not found: data/train.jsonl;"):  # relative, not a hub id
        read_records("data/train.jsonl")


def test_hub_id_falls_back_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(spec, split):
        calls.append((spec, split))
        return datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("org/name", "sft", split="test") == [{"prompt": [U("q")], "completion": [A("a")]}]
    assert calls == [("org/name", "test")]


def test_hub_unreachable(monkeypatch):
    import datasets

    def offline(spec, split):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        read_records("org/name")
    assert str(err.value) == (
        "dataset not found: org/name does not exist locally and could not be loaded from the "
        "Hugging Face Hub (ConnectionError: Couldn't reach 'org/name' on the Hub "
        "(LocalEntryNotFoundError)); check the path, or the network and the Hub id/split"
    )


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with raises(f"{tmp_path / 'e.jsonl'}: the dataset is empty (no rows)"):
        read_records(str(tmp_path / "e.jsonl"))
    with raises("the dataset is empty"):
        read_records(write_json(tmp_path / "e.json", []))


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with raises("unsupported file type '.csv'; use a .jsonl, .json or .parquet file"):
        read_records(str(tmp_path / "d.csv"))


def test_load_dataset_returns_dataset_with_columns(tmp_path):
    import datasets

    spec = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": "q2", "chosen": "g2", "rejected": "b2", "margin": 1.5},
        ],
    )
    ds = load_dataset(spec, "preference")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert len(ds) == 2
    assert ds[1]["prompt"] == [U("q2")] and ds[1]["margin"] == 1.5 and ds[0]["margin"] is None

    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", [{"messages": [U("q"), A("a")]}]), "sft")
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0] == {"prompt": [U("q")], "completion": [A("a")]}


def test_load_dataset_mixed_column_types(tmp_path):
    spec = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "x": 1}, {"prompt": "r", "x": [1]}])
    with raises(f"{spec}: cannot build a dataset ("):
        load_dataset(spec, "prompt")


def test_module_has_no_print():
    assert "print(" not in Path(data.__file__).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Real samples (LLaMA-Factory demo data, outside the project)
# --------------------------------------------------------------------------------------------


def test_real_alpaca_sft():
    path = real_data("alpaca_en_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = load_rows(str(path), "sft")
    assert len(rows) == 999 == len(raw)
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        assert len(row["completion"]) == 1
        assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"]
    assert raw[0]["instruction"] == "Describe a process of making crepes."
    assert rows[0]["prompt"] == [U("Describe a process of making crepes.")]
    assert rows[0]["completion"] == [A(raw[0]["output"])]
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert rows[with_input]["prompt"] == [U(raw[with_input]["instruction"] + "\n" + raw[with_input]["input"])]


def test_real_sharegpt_preference():
    path = real_data("dpo_en_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = load_rows(str(path), "preference")
    assert len(rows) == 300 == len(raw)
    multi_turn = sum(1 for r in rows if sum(m["role"] == "user" for m in r["prompt"]) > 1)
    assert multi_turn > 0
    for src, row in zip(raw, rows):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"] == [A(src["chosen"]["value"])]
        assert row["rejected"] == [A(src["rejected"]["value"])]
        has_system = any(m["from"] == "system" for m in src["conversations"])
        assert (row["prompt"][0]["role"] == "system") == has_system
    raw_system = sum(any(m["from"] == "system" for m in r["conversations"]) for r in raw)
    if raw_system:
        assert sum(r["prompt"][0]["role"] == "system" for r in rows) == raw_system >= 1
