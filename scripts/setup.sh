#!/usr/bin/env bash
# Creates .venv (if missing) and installs stun-exp with its test extras.
# On a machine without torch it installs the pinned CPU wheel first, so pip never pulls a CUDA build.
# GPU users: set TORCH_SPEC to your CUDA torch (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"),
# or install into an env that already has torch with: pip install -e ".[test]".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q -e ".[test]"
