#!/usr/bin/env bash
# Create .venv in the repository and install the package with its test and reward extras.
# torch is pinned to the CPU build first, so that no later requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,rewards]"
.venv/bin/python -c "import torch, cogrpo_lightning; print('torch', torch.__version__, '- cogrpo_lightning installed')"
