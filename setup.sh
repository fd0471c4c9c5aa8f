#!/usr/bin/env bash
# Creates .venv with everything the project, its tests and its benchmarks need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# The CPU build of torch goes in first, so that the `torch>=2.13` of the test extra is already
# satisfied and pip does not resolve it to a CUDA build of several GB.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[test,convert]"
