#!/usr/bin/env bash
# The pod subset of the tests (remat, scanned layers, FSDP mesh equivalence, `moetrain
# compile` for a TPU v5p topology) on the newest jax, flax and libtpu, in a Python 3.12
# virtualenv that this script creates (newer jax needs Python >= 3.12; the main suite runs
# on whatever python3 is). Usage: bash tests/newest_jax.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-newest}

find_python312() {
  local candidate
  # PYTHON312, PATH, pyenv versions (a shim on PATH may point at no installed 3.12),
  # uv-managed Pythons, the usual system places.
  for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
      "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
      "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
      "$(uv python find 3.12 2>/dev/null || true)" \
      "${UV_PYTHON_INSTALL_DIR:-$HOME/.local/share/uv/python}"/cpython-3.12*/bin/python3.12 \
      /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c 'import venv' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! python312=$(find_python312); then
  echo "tests/newest_jax.sh: no Python 3.12 found (looked at PYTHON312, on PATH, in pyenv," \
       "uv and /usr); install it (e.g. pyenv install 3.12 or uv python install 3.12) or set" \
       "PYTHON312=/path/to/python3.12." >&2
  exit 1
fi
echo "+ $python312 -m venv $venv && pip install -e '.[tpu]' pytest"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python312" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -U pip
"$venv/bin/python" -m pip install -q -U -e '.[tpu]' 'pytest>=8'
"$venv/bin/python" -c 'import jax, flax, libtpu; print("newest:", "jax", jax.__version__, "flax", flax.__version__, "libtpu", libtpu.__version__)' 2>/dev/null ||
  "$venv/bin/python" -c 'import jax, flax; print("newest:", "jax", jax.__version__, "flax", flax.__version__)'
# Only the modules that hold the subset: the others may import test-only packages (torch,
# transformers) this venv does not install.
mapfile -t modules < <(grep -l -E 'mark\.(newest_jax|libtpu)' tests/test_*.py)
exec "$venv/bin/python" -m pytest -q -m "newest_jax or libtpu" "${modules[@]}"
