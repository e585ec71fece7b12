"""Output folders that cannot be used (an existing file, a path below a file, a folder nothing can be
written in) fail at parse time with one line naming the path and exit 2, writing nothing: every
command and every folder-typed option (``BaseConfig.output_dirs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.cli import COMMANDS, _load_commands, main
from align.core.errors import ConfigError

from conftest import ROOT, run_align

_load_commands()


def _inputs(tiny_model: Path, demo_data: Path) -> dict[str, list[str]]:
    """The required options of each command besides its output folder."""
    model = ["--model_name_or_path", str(tiny_model)]
    return {
        "make-tiny-model": [],
        "demo-data": [],
        "situation-prompts": [],
        "sft": [*model, "--dataset", str(demo_data / "sft.jsonl")],
        "rm": [*model, "--dataset", str(demo_data / "pairs.jsonl")],
        "dpo": [*model, "--dataset", str(demo_data / "pairs.jsonl")],
        "rs": [*model, "--dataset", str(demo_data / "prompts.jsonl"), "--reward", "rule:arithmetic"],
        "eval": [*model, "--dataset", str(demo_data / "test.jsonl"), "--reward", "rule:arithmetic"],
        "rlhf": [*model, "--dataset", str(demo_data / "prompts.jsonl"), "--reward", "rule:arithmetic"],
        "merge": ["--models", f"{tiny_model},{tiny_model}"],
        "distill": [*model, "--teacher", str(tiny_model), "--dataset", str(demo_data / "sft.jsonl")],
        "select": ["--candidates", str(tiny_model), "--metric", "mean_reward"],
        "import-model": ["smollm2"],
        "run": [str(ROOT / "configs" / "recipes" / "quickstart.yaml")],
        "report": [],
    }


# The folder option of each command that writes one (``BaseConfig.output_dirs``); `status` only reads.
OUT_KEY = {"run": "workdir", "report": "workdir"}


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (unusable folder, what the message says about it)."""
    afile = tmp_path / "a_file.txt"
    afile.write_text("keep me\n")
    return {
        "existing_file": (afile, f"{afile} is an existing file, not a folder"),
        "below_a_file": (
            afile / "sub" / "out",
            f"cannot create {afile / 'sub' / 'out'}: {afile} is a file, not a folder",
        ),
        "unwritable": (Path("/proc/align-no-such/out"), "cannot write to /proc/align-no-such/out"),
    }


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_every_command_is_covered(tiny_model, demo_data):
    writers = {name for name, cmd in COMMANDS.items() if cmd.config.output_dirs}
    assert set(_inputs(tiny_model, demo_data)) == writers
    assert writers == set(COMMANDS) - {"status"}
    assert all(COMMANDS[name].config.output_dirs == (OUT_KEY.get(name, "output_dir"),) for name in writers - {"dpo"})


@pytest.mark.parametrize("case", ["existing_file", "below_a_file", "unwritable"])
@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"status"}))
def test_bad_output_dir_exits_2_naming_the_path(command, case, tiny_model, demo_data, tmp_path, capsys):
    path, message = _bad_paths(tmp_path)[case]
    before = _listing(tmp_path)
    key = OUT_KEY.get(command, "output_dir")
    code = main([command, *_inputs(tiny_model, demo_data)[command], f"--{key}", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"align {command}: error: '{key}' (from --{key}): {message}")
    assert err.endswith("; choose another path")
    assert _listing(tmp_path) == before and (tmp_path / "a_file.txt").read_text() == "keep me\n"


def test_bad_ref_cache_dir(tiny_model, demo_data, tmp_path, capsys):
    path, message = _bad_paths(tmp_path)["below_a_file"]
    code = main(
        [
            "dpo",
            *_inputs(tiny_model, demo_data)["dpo"],
            "--output_dir",
            str(tmp_path / "out"),
            "--ref_cache_dir",
            str(path),
        ]
    )
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"align dpo: error: 'ref_cache_dir' (from --ref_cache_dir): {message}; choose another path"
    )
    assert not (tmp_path / "out").exists()


def test_positional_dir_and_yaml_key_are_named(tmp_path, capsys):
    afile = tmp_path / "model.bin"
    afile.write_text("x")
    assert main(["make-tiny-model", str(afile)]) == 2
    assert f"'output_dir' (positional argument): {afile} is an existing file" in capsys.readouterr().err
    config = tmp_path / "demo.yaml"
    config.write_text(f"output_dir: {afile}/demo\n")
    assert main(["demo-data", "--config", str(config)]) == 2
    assert f"'output_dir' (in {config}): cannot create {afile}/demo: {afile} is a file" in capsys.readouterr().err


def test_console_script_one_line_no_traceback(tiny_model, demo_data, tmp_path):
    afile = tmp_path / "out"
    afile.write_text("")
    proc = run_align(
        "sft", "--model_name_or_path", tiny_model, "--dataset", demo_data / "sft.jsonl", "--output_dir", afile
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"align sft: error: 'output_dir' (from --output_dir): {afile} is an existing file, not a folder; choose another path"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_usable_folders_pass_and_leave_nothing(tmp_path):
    from align.core.config import check_output_dir

    check_output_dir(str(tmp_path / "new" / "deeper"), "output_dir")  # created later, by the stage
    check_output_dir(str(tmp_path), "output_dir")  # an existing folder
    assert list(tmp_path.iterdir()) == []  # the write probe is gone
    with pytest.raises(ConfigError, match="cannot write to /sys/align-h2"):
        check_output_dir("/sys/align-h2", "output_dir")
