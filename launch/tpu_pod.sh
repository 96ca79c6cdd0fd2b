#!/usr/bin/env bash
# Cloud TPU VM pod slice: installs moetrain on every worker and starts the same command on
# all of them; `--distributed` lets JAX discover the other hosts from the TPU metadata.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#       --config=configs/deepseek_style.py --workdir=gs://bucket/runs/ds \
#       --config.mesh.expert=8
#
# The workdir must be visible to every host (a GCS bucket or a shared filesystem):
# checkpoints are written collectively. REPO (default: this checkout's origin URL) and
# BRANCH (default: main) say what each worker clones.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${REPO:-$(git config --get remote.origin.url)}
branch=${BRANCH:-main}
args=$(printf '%q ' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d moetrain ]; then git clone --branch $branch $repo moetrain; fi
  cd moetrain && git fetch -q && git checkout -q $branch && git pull -q
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  moetrain train --distributed $args
"
