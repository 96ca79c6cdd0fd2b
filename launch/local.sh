#!/usr/bin/env bash
# Multi-process training on one machine: N processes, each with its own devices, joined
# into one mesh by jax.distributed (what a multi-host pod does, without the pod).
#
#   launch/local.sh 2 moetrain train --config=configs/tiny.py --workdir=runs/mp \
#       --config.mesh.expert=4
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (default 2), or, with
# GPUS_PER_PROCESS set, its own slice of CUDA_VISIBLE_DEVICES. Logs: WORKDIR-less
# launch/logs/process_I.log (or $LOG_DIR). Exits non-zero if any process fails.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES moetrain train --config=... --workdir=..." >&2
  exit 2
fi
num_processes=$1
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-2}
log_dir=${LOG_DIR:-launch/logs}
mkdir -p "$log_dir"

pids=()
for ((i = 0; i < num_processes; i++)); do
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    export CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))
  else
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${EXTRA_XLA_FLAGS:-}"
  fi
  "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" \
      --process_id="$i" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done

# Processes in the order they end: each failure is named (with its signal, and the
# process's own one-line reason if it gave one) as it happens, so a dead process shows at
# once, not after the others. The others stop on their own within moetrain's
# --heartbeat_timeout (10 s), naming the dead one.
declare -A index
for i in "${!pids[@]}"; do index[${pids[$i]}]=$i; done
status=0
while ((${#index[@]})); do
  set +e
  wait -n -p done_pid "${!index[@]}" 2>/dev/null  # bash would add its own "Killed" line.
  rc=$?
  set -e
  [[ -n ${index[${done_pid:-none}]:-} ]] || continue
  i=${index[$done_pid]}
  unset "index[$done_pid]"
  if ((rc != 0)); then
    how="exit status $rc"
    ((rc > 128)) && how="killed by SIG$(kill -l $((rc - 128)))"
    reason=$(grep '^moetrain: ' "$log_dir/process_$i.log" | tail -n 1 || true)
    echo "process $i failed ($how); see $log_dir/process_$i.log${reason:+: $reason}" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then
  tail -n 5 "$log_dir/process_0.log"
fi
exit $status
