#!/usr/bin/env bash
# Cloud TPU VM pod slice: one `gcloud compute tpus tpu-vm ssh --worker=all` that clones (or
# updates) moetrain on every worker, installs it, and starts the same training command on
# all of them; `--distributed` lets JAX discover the other hosts from the TPU metadata.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh [--dry-run] \
#       --config=configs/deepseek_style.py --workdir=gs://bucket/runs/ds \
#       --config.mesh.expert=8
#
# --dry-run prints the gcloud command (quoted for a shell) instead of running it.
# The workdir must be visible to every host (a GCS bucket or a shared filesystem):
# checkpoints are written collectively. Settings, from the environment:
#   TPU_NAME, ZONE  the TPU VM and its zone (required); PROJECT: gcloud --project (optional)
#   REPO, BRANCH    what each worker clones into ~/moetrain (default: this checkout's origin
#                   URL, and main); an existing clone is fast-forwarded to BRANCH
#   INSTALL         the install command, run in the clone (default: a .venv from python3
#                   with `pip install -e '.[tpu]'`; the tpu extra needs Python >= 3.12 on
#                   the TPU VM image)
# tests/test_tpu_pod.py runs this script against a stub gcloud that starts each worker's
# command as a local process.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to the TPU VM zone}"
repo=${REPO:-$(git config --get remote.origin.url || true)}
: "${repo:?set REPO to the git URL the workers clone (this checkout has no origin)}"
branch=${BRANCH:-main}
install=${INSTALL:-'python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[tpu]"'}

# Words quoted for the worker's shell.
repo_q=$(printf '%q' "$repo")
branch_q=$(printf '%q' "$branch")
args_q=$(printf ' %q' "$@")

remote="set -e
if [ ! -d moetrain ]; then git clone -q --branch $branch_q $repo_q moetrain; fi
cd moetrain
git fetch -q origin $branch_q && git checkout -q $branch_q && git merge -q --ff-only FETCH_HEAD
$install
moetrain train --distributed$args_q"

command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all
         --command="$remote")
if [[ -n "${PROJECT:-}" ]]; then
  command+=(--project="$PROJECT")
fi

# One word for a POSIX shell: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

if ((dry_run)); then
  separator=''
  for word in "${command[@]}"; do
    printf '%s' "$separator"
    quote "$word"
    separator=' '
  done
  printf '\n'
  exit 0
fi
exec "${command[@]}"
