#!/usr/bin/env bash
# The GPU checks, prepared to fit one call on a lent GPU machine (the `device` tool: 15 minutes of device
# time per task, at most 10 minutes per command; its image has jax, torch, transformers, numpy, but no
# package index):
#
#   bench/device.sh fetch     # here: the wheels the image lacks, into .whl/ (git-ignored, 47 MB)
#   run(command="bench/device.sh", carry=[".whl"], timeout_s=600)     # there: "train" and "main" below
#   run(command="bench/device.sh llama", carry=[".whl"], timeout_s=300)  # a second call, if time is left
#
# There, it installs those wheels beside the image's jax, torch and transformers, then writes into $OUT:
#   env.log                  the GPU, the versions in use
#   bench_train.log          bench/train.py at its CPU configuration (the README's), PyTorch on the GPU
#   bench_train_wide.log     the same at LLaMA-7B width (EVA 8 of 39 blocks, image Q-Former 12 layers,
#                            LLaMA 4096 x 2 layers, batch 8)
#   main_job.log, summary.json   the README's main job (train.py --config configs/synthetic.py) on the GPU
#   bench_llama.log          bench/llama.py in bf16 at LLaMA-7B width, 8 layers (forward, KV-cache decoding)
# Each step has its own time limit, so that a hang in one still leaves the others' logs.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned to what setup.sh installs here; only what the image lacks, or has at a version our code does
# not take (flax, optax and orbax move their APIs fast). The image's transformers (5.17 when last read)
# is older than our pin: it serves the PyTorch reference, which uses nothing newer.
WHEELS=(av==18.1.0 tensorboardX==2.6.5 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 grain==0.2.18
        array-record==0.8.6 ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0
        googleapis-common-protos==1.76.0 immutabledict==4.3.1 portpicker==1.6.0 toml==0.10.2 termcolor==3.3.0
        simple-parsing==0.1.9 docstring-parser==0.18.0 dm-tree==0.1.10 soxr==1.1.0)
SDISTS=(promise==2.3)  # no wheel on the index: built here (pure Python)

if [ "${1:-}" = fetch ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}" || exit
  python3 -m pip wheel -q --no-deps -w .whl "${SDISTS[@]}" || exit
  du -sh .whl
  exit
fi

out=${OUT:-/tmp/device_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels: run 'bench/device.sh fetch' here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # JAX preallocates; leave the rest to PyTorch
smoke='import jax, vllama_jax.train.step, vllama_jax.pretrained
from flax import nnx
print(jax.jit(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))(jax.numpy.ones((1, 2))).devices())'
if ! python3 -c "$smoke"; then  # our Flax / Optax / Orbax pins do not run on the image's jax: take its own
  echo "falling back to the image's flax, optax and orbax-checkpoint" | tee "$out/fallback.log"
  rm -rf /tmp/site/flax /tmp/site/flax-* /tmp/site/optax /tmp/site/optax-* /tmp/site/orbax /tmp/site/orbax_checkpoint-*
  python3 -c "$smoke" 2>&1 | tee -a "$out/fallback.log"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  python3 -c "import jax, flax, optax, orbax.checkpoint as ocp, torch, transformers, grain
print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'optax', optax.__version__,
      'grain', grain.__version__); print('torch', torch.__version__, torch.cuda.is_available(),
      'transformers', transformers.__version__)"
} 2>&1 | tee "$out/env.log"

what=${1:-all}
if [ "$what" = all ] || [ "$what" = train ]; then
  timeout 140 python3 bench/train.py --repeats 10 2>&1 | tee "$out/bench_train.log"
  timeout 210 python3 bench/train.py --repeats 10 --vit-depth 8 --image-qformer-layers 12 --hidden 4096 \
    --layers 2 --batch 8 2>&1 | tee "$out/bench_train_wide.log"
fi
if [ "$what" = all ] || [ "$what" = main ]; then
  timeout 210 python3 train.py --config configs/synthetic.py --workdir /tmp/synthetic 2>&1 | tee "$out/main_job.log"
  cp /tmp/synthetic/summary.json "$out/" 2>/dev/null
fi
if [ "$what" = llama ]; then
  timeout 250 python3 bench/llama.py --dtype bfloat16 --hidden 4096 --layers 8 --repeats 5 2>&1 \
    | tee "$out/bench_llama.log"
fi
exit 0
