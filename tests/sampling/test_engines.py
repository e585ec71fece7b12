"""sampling.engines: ``--engine auto`` falls back only when vLLM is not installed, says so, and
every stage that generates records the engine it used; the CLI hides only known library noise."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

from align.cli import NOISY_WARNINGS, _quiet_libraries
from align.core.errors import ConfigError
from align.stages.rs import RSConfig, run_rs
from sampling import engines
from sampling.base import ENGINES
from sampling.hf import TransformersEngine

from conftest import ALIGN, ROOT

FALLBACK = "engine auto: vLLM is not installed, generating with transformers"


@pytest.fixture()
def no_vllm(monkeypatch):
    """Make vLLM look not installed (``find_spec`` finds nothing), as on a machine without it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        engines.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )


def test_auto_falls_back_to_transformers_only_when_vllm_is_missing_and_says_so(no_vllm, tiny_model, capsys):
    assert engines.default_engine() == "transformers"
    engine = engines.build_engine("auto", str(tiny_model), max_model_len=64)
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert lines == [FALLBACK + " (slower; install vllm, or pass --engine transformers to choose it)"]


def test_auto_picks_vllm_when_installed():
    assert engines.default_engine() == "vllm"  # the test environment has vLLM's CPU build
    assert ENGINES["vllm"].name == "vllm" and ENGINES["transformers"].name == "transformers"


def test_a_broken_vllm_install_is_an_error_not_a_fallback(monkeypatch, tmp_path, tiny_model, capsys):
    """An installed vLLM that fails to import (here: the torchvision operator mismatch a CPU
    build hits) stops the run with its own error instead of silently generating with transformers."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert engines.default_engine() == "vllm"
    with pytest.raises(RuntimeError, match="torchvision::nms does not exist"):
        engines.build_engine("auto", str(tiny_model), max_model_len=64)
    assert FALLBACK not in capsys.readouterr().err


def test_an_engine_construction_error_propagates(monkeypatch, tiny_model):
    class Rejecting:
        @classmethod
        def from_pretrained(cls, model_path, **options):
            raise ValueError(f"max_model_len {options['max_model_len']} exceeds the model's limit")

    monkeypatch.setitem(ENGINES._items, "vllm", Rejecting)
    with pytest.raises(ValueError, match="max_model_len 100000 exceeds"):
        engines.build_engine("auto", str(tiny_model), max_model_len=100000)


def test_rs_records_the_engine_in_stage_json(tiny_model, demo_data, tmp_path, no_vllm, capsys):
    cfg = RSConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(demo_data / "prompts.jsonl"),
        output_dir=str(tmp_path / "rs"),
        reward=["rule:arithmetic"],
        num_samples=2,
        max_tokens=2,
        max_prompts=4,
        shard_size=2,
        max_model_len=64,
    )
    record = run_rs(cfg)
    assert record["summary"]["engine"] == "transformers" and record["summary"]["shards"] == 2
    assert json.loads((tmp_path / "rs" / "stage.json").read_text())["summary"]["engine"] == "transformers"
    assert FALLBACK in capsys.readouterr().err


SCORER = """import warnings


def warns(prompt, response, **columns):
    warnings.warn("warns_scorer: this scorer is deprecated", UserWarning)
    return 1.0
"""


@pytest.mark.slow
def test_cli_shows_a_user_scorers_warning_and_eval_records_the_engine(tiny_model, demo_data, tmp_path):
    (tmp_path / "warns_scorer.py").write_text(SCORER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            *ALIGN,
            "eval",
            "--model_name_or_path",
            str(tiny_model),
            "--dataset",
            str(demo_data / "test.jsonl"),
            "--reward",
            "warns_scorer:warns",
            "--engine",
            "transformers",
            "--max_prompts",
            "2",
            "--max_tokens",
            "2",
            "--max_model_len",
            "64",
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning: warns_scorer: this scorer is deprecated" in proc.stderr
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["engine"] == "transformers" and summary["mean_reward"] == 1.0


# One warning each filter must hide, as the library issues it: (text, issuing module).
NOISE_SEEN = {
    r"`torch\.distributed\.reduce_op` is deprecated": (
        "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
        "vllm.triton_utils.dispatcher",
    ),
}


@pytest.mark.parametrize("category, message, module", NOISY_WARNINGS)
def test_only_the_known_library_noise_is_hidden(category, message, module):
    text, issuer = NOISE_SEEN[message]
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        _quiet_libraries()
        warnings.warn_explicit(text, category, "lib.py", 1, module=issuer)  # hidden
        warnings.warn_explicit(text, category, "user.py", 1, module="user_code")  # same text from elsewhere: shown
        warnings.warn_explicit("something else", category, "lib.py", 2, module=issuer)  # other text: shown
        warnings.warn_explicit("a user warning", UserWarning, "user.py", 2, module="user_code")
    assert [(str(w.message), w.filename) for w in seen] == [
        (text, "user.py"),
        ("something else", "lib.py"),
        ("a user warning", "user.py"),
    ]


@pytest.mark.parametrize(
    ("cores", "environ", "threads"),
    [
        (2, {}, 2),  # the process's cores, alone
        (2, {"OMP_NUM_THREADS": "1"}, 1),  # a job that split the cores between workers
        (8, {"OMP_NUM_THREADS": "3"}, 3),
        (2, {"OMP_NUM_THREADS": "4"}, 2),  # OMP_NUM_THREADS caps, never raises
        (8, {"LOCAL_WORLD_SIZE": "2"}, 4),  # two ranks on this machine share its cores
        (2, {"LOCAL_WORLD_SIZE": "4"}, 1),
        (2, {"OMP_NUM_THREADS": "many", "LOCAL_WORLD_SIZE": ""}, 2),  # not a number: ignored, as OpenMP does
        (1, {}, 1),
    ],
)
def test_default_threads_are_the_process_cores_shared_by_ranks_and_capped_by_omp(cores, environ, threads):
    assert engines.default_threads(environ, cores=cores) == threads


def test_unset_threads_resolve_from_the_affinity_mask_and_an_explicit_value_wins(monkeypatch):
    built = []
    monkeypatch.setattr(engines, "build_engine", lambda name, path, **options: built.append(options["threads"]))
    monkeypatch.setattr(engines.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    base = ["--model_name_or_path", "m", "--dataset", "d.jsonl", "--reward", "rule:arithmetic", "--output_dir", "o"]
    from align.core.config import parse_config

    parse_config(RSConfig, base).build_engine("m")
    parse_config(RSConfig, [*base, "--threads", "1"]).build_engine("m")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    parse_config(RSConfig, base).build_engine("m")
    assert built == [3, 1, 2]
    with pytest.raises(ConfigError, match="'threads' must be >= 1, got 0"):
        parse_config(RSConfig, [*base, "--threads", "0"]).validate_engine()
