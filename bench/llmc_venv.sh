#!/usr/bin/env bash
# Creates bench/.venv-llmc: llm-compressor in its own virtual environment, the anchor for
# bench/prune_quality.py. Its own pins (transformers, compressed-tensors) stay out of .venv.
# torch is pinned to the local CPU wheel: an unpinned torch makes pip pull a multi-GB CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${LLMC_VENV:-$here/.venv-llmc}"
python="${PYTHON:-python3}"
llmc="${LLMC_VERSION:-llmcompressor}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "$llmc"
"$venv/bin/python" -c "import llmcompressor, transformers, torch; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
