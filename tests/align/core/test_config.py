"""The typed config layer: YAML + flags, type checks, unknown keys, help and docs from one source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from align.core.config import BaseConfig, coerce, help_text, markdown, option, parse_config, required
from align.core.errors import ConfigError


@dataclasses.dataclass
class Toy(BaseConfig):
    positional: ClassVar[str] = "output_dir"
    output_dir: str = required("Where outputs go.")
    learning_rate: float = option(1e-5, "Peak learning rate.")
    max_steps: int = option(-1, "Steps.")
    use_lora: bool = option(False, "LoRA.")
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", "Loss name.")
    eval_dataset: str | None = option(None, "Eval data.")
    targets: list[str] = option(["all-linear"], "Target modules.")

    def validate(self) -> None:
        if self.max_steps == 0:
            raise ConfigError("'max_steps' must not be 0")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_override(tmp_path):
    cfg = parse_config(
        Toy, ["--config", write(tmp_path, "output_dir: a\nlearning_rate: 1.0e-3\nmax_steps: 7\n"), "--max_steps", "9"]
    )
    assert (cfg.output_dir, cfg.learning_rate, cfg.max_steps) == ("a", 1e-3, 9)


def test_positional_equals_and_bool_forms():
    cfg = parse_config(Toy, ["out", "--learning_rate=3e-4", "--use_lora", "--targets", "q_proj,v_proj"])
    assert cfg.output_dir == "out" and cfg.learning_rate == 3e-4 and cfg.use_lora is True
    assert cfg.targets == ["q_proj", "v_proj"]
    assert parse_config(Toy, ["out", "--use_lora", "false"]).use_lora is False
    assert parse_config(Toy, ["out", "--eval_dataset", "null"]).eval_dataset is None
    assert parse_config(Toy, ["out", "--max-steps", "1e3"]).max_steps == 1000


def test_defaults_do_not_share_lists():
    a, b = parse_config(Toy, ["x"]), parse_config(Toy, ["y"])
    a.targets.append("z")
    assert b.targets == ["all-linear"]


def test_unknown_flag_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown flag --learning_rat; did you mean --learning_rate\?"):
        parse_config(Toy, ["x", "--learning_rat", "1"])


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = write(tmp_path, "output_dir: a\nmax_step: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'max_step' in {path}; did you mean max_steps\?"):
        parse_config(Toy, ["--config", path])


def test_wrong_type_names_key_type_and_value(tmp_path):
    with pytest.raises(
        ConfigError, match=r"config key 'max_steps' \(from --max_steps\) expects an integer, got 'ten'"
    ):
        parse_config(Toy, ["x", "--max_steps", "ten"])
    path = write(tmp_path, "output_dir: a\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"'learning_rate' \(in .*c.yaml\) expects a number, got 'fast'"):
        parse_config(Toy, ["--config", path])
    with pytest.raises(ConfigError, match=r"'loss' .* expects one of 'sigmoid', 'ipo', got 'hinge'"):
        parse_config(Toy, ["x", "--loss", "hinge"])
    with pytest.raises(ConfigError, match=r"'use_lora' .* expects a boolean"):
        parse_config(Toy, ["--config", write(tmp_path, "output_dir: a\nuse_lora: 3\n")])


def test_missing_required_and_validate():
    with pytest.raises(ConfigError, match=r"missing required 'output_dir'"):
        parse_config(Toy, ["--max_steps", "3"])
    with pytest.raises(ConfigError, match=r"'max_steps' must not be 0"):
        parse_config(Toy, ["x", "--max_steps", "0"])


def test_flag_without_value_and_stray_argument():
    with pytest.raises(ConfigError, match=r"flag --max_steps needs a value"):
        parse_config(Toy, ["x", "--max_steps"])
    with pytest.raises(ConfigError, match=r"unexpected argument 'y'"):
        parse_config(Toy, ["x", "y"])


def test_yaml_must_be_mapping_and_valid(tmp_path):
    with pytest.raises(ConfigError, match=r"a config must be a mapping"):
        parse_config(Toy, ["--config", write(tmp_path, "- a\n- b\n")])
    with pytest.raises(
        ConfigError, match=r"c.yaml:2: found character '\\t' that cannot start any token; fix the YAML syntax"
    ):
        parse_config(Toy, ["--config", write(tmp_path, "output_dir: a\n\tmax_steps: 3\n")])
    with pytest.raises(ConfigError, match=r"config file not found: nope.yaml"):
        parse_config(Toy, ["--config", "nope.yaml"])


def test_yaml_is_safe_loaded(tmp_path):
    path = write(tmp_path, "output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"could not determine a constructor"):
        parse_config(Toy, ["--config", path])


def test_coerce_table():
    assert coerce(int, "12") == 12 and coerce(float, 3) == 3.0 and coerce(bool, "yes") is True
    for tp, bad in [(int, "1.5"), (int, True), (float, "nan"), (bool, "maybe"), (str, [1])]:
        with pytest.raises(ValueError):
            coerce(tp, bad)


def test_help_and_markdown_come_from_fields():
    text = help_text("toy", Toy, "A toy.")
    assert "usage: align toy [--config FILE.yaml] OUTPUT_DIR" in text
    assert "--learning_rate  (a number; default 1e-05)\n      Peak learning rate." in text
    table = markdown("toy", Toy, "A toy.")
    assert "| `loss` | one of 'sigmoid', 'ipo' | `'sigmoid'` | Loss name. |" in table
    assert "| `output_dir` | a string | `required` | Where outputs go. |" in table
