#!/bin/bash
# What a lent GPU runs, in two calls of the device tool (each under its 10-minute limit; the
# session's 15 minutes of device time hold both and a machine start), for issue 17:
#
#   bash bench/gpu_check.sh a   # ~6 min: correctness of every kernel path, then G1-G4
#   bash bench/gpu_check.sh b   # ~5 min: where the time goes, then the other variants
#
#   a. bench/gpu_check.py (ragged all-to-all, ragged_dot, tokamax and cuDNN grouped matmuls
#      against the padded reference, values and gradients, f32 and bf16); then bench/run.py
#      --mode=sequential on the ~1B configs that decide the acceptance: moe8_1b, moe64_1b
#      (MFU against the datasheet peak, G1/G2; their step ratio G3), moe8_1b_dropless (G4,
#      what `auto` picks) and moe8_1b_tokamax.
#   b. bench/profile.py's breakdown of moe8_1b and moe64_1b (attention, expert matmuls,
#      dispatch/combine, all-to-all, optimizer, the rest; and how much of the device time the
#      trace attributes); then dense_1b, the padded and XLA-ragged dropless variants, and
#      the XLA ragged path with the cuDNN grouped-GEMM flag (when this jaxlib has it).
#
# On a GPU of less than ~90 GB (an 80 GB H100) moe64_1b and the padded dropless variant
# do not fit at 16 x 2048 tokens (bench/NOTES.md, "GPU plan"): this script then sets
# data.batch_size=8 for every config, and the JSON's command line says so.
# Packages the GPU image lacks travel as wheels in .whl/ (bench/gpu_wheels.sh fetches them
# here; name .whl in the device tool's carry); the image's own jax, flax, optax and orbax
# are used. Logs and JSON go to $OUT (8 files at most come back); the tables print last.
set -o pipefail
phase=${1:?usage: bash bench/gpu_check.sh a|b}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices())'
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
sets=()
if [[ ${memory_mib:-0} -lt 92000 ]]; then
  sets=(--set data.batch_size=8)
  echo "GPU memory ${memory_mib} MiB < 92000: every config runs at 8 x 2048 tokens"
fi
bench() {  # bench <seconds> <json name> <configs> [XLA flag]
  XLA_FLAGS="${XLA_FLAGS:-} ${4:-}" timeout "$1" python3 bench/run.py --no-a2a \
    --mode=sequential --matmul-n=8192 --rounds=3 --steps=3 --warmup=2 --configs="$3" \
    "${sets[@]}" --out "$out/$2" 2>&1 | tee -a "$out/bench.log" | grep -v '^round'
}
rc=0
case $phase in
  a)
    timeout 120 python3 bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log" || rc=1
    bench 330 bench_1b_a.json moe8_1b,moe64_1b,moe8_1b_dropless,moe8_1b_tokamax || rc=1
    ;;
  b)
    for config in moe8_1b moe64_1b; do
      timeout 100 python3 bench/profile.py "$config" --steps=3 "${sets[@]}" \
        --out "$out/profile_$config.json" 2>&1 | tee "$out/profile_$config.log" || rc=1
    done
    bench 200 bench_1b_b.json dense_1b,moe8_1b,moe8_1b_dropless_padded,moe8_1b_dropless_ragged || rc=1
    flag=--xla_gpu_experimental_use_ragged_dot_fusion=true
    if python3 bench/gpu_check.py --has-xla-flag "${flag%%=*}"; then
      bench 100 bench_1b_cudnn.json moe8_1b_dropless_ragged,moe64_1b_dropless_ragged "$flag" || rc=1
    else
      echo "this jaxlib has no ${flag%%=*}: the cuDNN ragged-dot variant is not run"
    fi
    ;;
  *) echo "unknown phase $phase (a or b)" >&2; exit 2 ;;
esac
exit $rc
