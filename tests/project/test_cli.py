"""The CLI surface: help, docs from the same source, and bad input -> one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.cli import COMMANDS, main

from conftest import ROOT, run_align


def call(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands(capsys):
    code, out, _ = call(capsys, "--help")
    assert code == 0
    for name in ("sft", "make-tiny-model", "demo-data"):
        assert f"  {name}" in out


def test_help_lists_the_registered_commands():
    """The overview reads each command's name and summary from its module's source: the registered ones."""
    from align.cli import _load_commands, declared_commands

    _load_commands()
    declared = declared_commands()
    assert len(declared) == len(COMMANDS)
    assert dict(declared) == {name: cmd.summary for name, cmd in COMMANDS.items()}


def test_help_imports_neither_torch_nor_a_stage():
    """`import align.cli` and `align --help` start in a fraction of a second: no torch, no stage module."""
    code = (
        "import sys\nimport align.cli\nprint('torch' in sys.modules)\nalign.cli.main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vllm')"
        " or m.startswith('align.stages.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False" and lines[-1] == "[]", proc.stdout


def test_command_help_lists_every_field(capsys):
    code, out, _ = call(capsys, "sft", "--help")
    assert code == 0
    assert out.startswith("usage: align sft [--config FILE.yaml]")
    for field in dataclasses.fields(COMMANDS["sft"].config):
        assert f"--{field.name}  (" in out


def test_docs_are_generated_from_configs():
    from align.docs import render

    assert (ROOT / "docs" / "configs.md").read_text() == render(), "run: python -m align.docs > docs/configs.md"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """configs/demo_COMMAND.yaml parses as COMMAND's config and every value it sets lands there."""
    from align.cli import _load_commands
    from align.core.config import fields_of, load_yaml, parse_config

    _load_commands()
    command = COMMANDS[path.stem.removeprefix("demo_")]
    values = load_yaml(path)
    assert values and set(values) <= set(fields_of(command.config))
    required = [a for k in ("model_name_or_path", "dataset", "output_dir") if k not in values for a in (f"--{k}", "x")]
    cfg = parse_config(command.config, ["--config", str(path), *required])
    for key, value in values.items():
        parsed = getattr(cfg, key)
        assert parsed == ([value] if isinstance(parsed, list) and not isinstance(value, list) else value), key


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads_in_accelerate(path):
    """accelerate's own loader reads each file (unknown keys fail there), and `accelerate launch`
    ends up with every value the file sets, nested deepspeed_config / fsdp_config ones included."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    values = yaml.safe_load(path.read_text())
    loaded = load_config_from_file(str(path))
    for key, value in values.items():
        assert getattr(loaded, key) == value, key
    parser = launch_command_parser()
    options = vars(parser.parse_args(["x.py"]))
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "x.py"]))
    nested = {
        ("fsdp_" + k if name == "fsdp_config" and not k.startswith("fsdp_") else k): v
        for name, section in values.items()
        if isinstance(section, dict)
        for k, v in section.items()
    }
    for key, value in nested.items():
        assert key in options, f"{path.name}: {key} is not an accelerate launch option"
        assert getattr(args, key) == value, key
    assert args.num_processes == values["num_processes"]


@pytest.fixture()
def jsonl(tmp_path):
    def write(name: str, lines: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines))
        return path

    return write


GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]})


def sft_args(tmp_path, model, data, *extra):
    return [
        "sft",
        "--model_name_or_path",
        model,
        "--dataset",
        data,
        "--output_dir",
        tmp_path / "out",
        "--max_steps",
        "2",
        *extra,
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sfx"], "align: error: unknown command 'sfx' (did you mean 'sft'?); valid: "),
        (["sft", "--learning_rat", "1"], "unknown flag --learning_rat; did you mean --learning_rate?"),
        (["sft", "--max_steps", "many"], "config key 'max_steps' (from --max_steps) expects an integer, got 'many'"),
        (["sft", "--max_steps", "3"], "missing required 'model_name_or_path'"),
        (["sft", "--config", "no/such.yaml"], "config file not found: no/such.yaml"),
        (
            ["make-tiny-model", "x", "--arch", "gpt5"],
            "config key 'arch' (from --arch) expects one of 'llama', 'qwen2', got 'gpt5'",
        ),
        (
            ["sft", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--warmup_ratio", "1.5"],
            "'warmup_ratio' must be in [0, 1), got 1.5",
        ),
        (
            ["sft", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--merge_lora"],
            "'merge_lora' needs use_lora",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = call(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_yaml_key_names_the_file(capsys, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("learning_rate: 1.0e-3\nmax_stesp: 10\n")
    code, _, err = call(capsys, "sft", "--config", path)
    assert code == 2
    assert f"unknown key 'max_stesp' in {path}; did you mean max_steps?" in err


def test_missing_dataset(capsys, tmp_path, tiny_model):
    code, _, err = call(capsys, *sft_args(tmp_path, tiny_model, tmp_path / "nope.jsonl"))
    assert code == 2 and f"dataset not found: {tmp_path / 'nope.jsonl'}" in err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, tiny_model, jsonl):
    data = jsonl("bad.jsonl", [GOOD_ROW, '{"messages": [', GOOD_ROW])
    code, _, err = call(capsys, *sft_args(tmp_path, tiny_model, data))
    assert code == 2 and f"{data}:2: invalid JSON" in err
    assert not (tmp_path / "out" / "stage.json").exists()


def test_missing_columns_lists_expected_schemas(capsys, tmp_path, tiny_model, jsonl):
    data = jsonl("cols.jsonl", [json.dumps({"question": "1+1=", "reply": "2"})])
    code, _, err = call(capsys, *sft_args(tmp_path, tiny_model, data))
    assert code == 2
    assert f"{data}:1: no sft columns found (has: question, reply); expected one of:" in err
    assert "messages" in err and "instruction" in err and "conversations" in err


def test_unknown_role_and_empty_conversation(capsys, tmp_path, tiny_model, jsonl):
    data = jsonl(
        "role.jsonl",
        [json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "2"}]})],
    )
    code, _, err = call(capsys, *sft_args(tmp_path, tiny_model, data))
    assert code == 2 and "unknown role 'robot'" in err and "user" in err
    data = jsonl("empty.jsonl", [GOOD_ROW, json.dumps({"messages": []})])
    code, _, err = call(capsys, *sft_args(tmp_path, tiny_model, data))
    assert code == 2 and f"{data}:2:" in err and "empty conversation" in err


def test_missing_model(capsys, tmp_path, jsonl):
    data = jsonl("ok.jsonl", [GOOD_ROW])
    code, _, err = call(capsys, *sft_args(tmp_path, tmp_path / "no-model", data))
    assert code == 2 and f"model not found: {tmp_path / 'no-model'}" in err


@pytest.mark.slow
def test_console_script_error_has_no_traceback_unless_debug(tmp_path):
    proc = run_align(
        "sft", "--model_name_or_path", "m", "--dataset", tmp_path / "x.jsonl", "--output_dir", tmp_path / "o"
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"align sft: error: dataset not found: {tmp_path / 'x.jsonl'}; give an existing"
    )
    proc = run_align(
        "sft",
        "--model_name_or_path",
        "m",
        "--dataset",
        tmp_path / "x.jsonl",
        "--output_dir",
        tmp_path / "o",
        "--debug",
    )
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
