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
# PyTorch references the parity tests import, installed without letting pip resolve them (it would
# pull a CUDA torch): ImageBind's model code and audio loader (CC-BY-NC, a test reference only),
# pytorchvideo 0.1.5 for that loader's clip sampler (the release's version; of its own declared
# dependencies that path imports only iopath, from the test extra), timm, torchvision (made importable by
# vllama_jax.torch_compat), and torchaudio for its Kaldi filterbank and resampler, whose pure-Python
# fallback needs none of its native libraries (built for another torch).
"${pip[@]}" --no-deps "imagebind-unofficial==0.1.1" "pytorchvideo==0.1.5" "timm==1.0.31" "torchvision==0.28.0" \
  "torchaudio==2.11.0"
rm -f "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
