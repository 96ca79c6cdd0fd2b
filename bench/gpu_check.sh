#!/bin/bash
# Everything a lent GPU should run, in one call (bench/NOTES.md has the last results):
#   1. bench/gpu_check.py: ragged all-to-all and ragged_dot against the padded paths;
#   2. bench/run.py at d_model 1024 in bfloat16: MFU of dense / moe8 / moe64 and the two
#      dropless implementations;
#   3. the README's main job (configs/tiny.py), 100 steps.
# Wheels for the packages the GPU image lacks (ml_collections, tensorboardX) travel in
# .whl/ (see the device tool's README; the image's own jax and flax are used: flax 0.12.8
# does not import under its jax 0.11.2); logs and JSON go to $OUT.
set -o pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__,
  "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__)'
timeout 240 python3 bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log"
rc=$?
timeout 300 python3 bench/run.py --no-a2a --d-model=1024 --batch-size=64 --matmul-n=8192 \
  --rounds=3 --configs=dense,moe8,moe64,drop_ragged,drop_padded \
  --out "$out/bench_gpu.json" 2>&1 | tail -20 | tee "$out/bench.log"
timeout 150 python3 -m moetrain.cli train --config=configs/tiny.py --config.train.steps=100 \
  --workdir=/tmp/gpu_tiny 2>&1 | tail -8 | tee "$out/train.log"
exit $rc
