#!/bin/bash
# Downloads into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks
# (it has Python 3.12, jax 0.11.2 with the CUDA plugin, flax, optax, orbax, etils, chex,
# and no registry access): ml_collections and tensorboardX for moetrain, tokamax and its
# dependencies for model.moe.grouped_matmul='tokamax'. bench/gpu_check.sh installs them
# there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
# Versions are pinned to a set that imports together (pydantic pins pydantic-core
# exactly); jaxtyping (tokamax needs >= 0.3) and tqdm travel too, in case the image has
# an older one or none.
#   bash bench/gpu_wheels.sh            # then check: du -ch .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(
  ml_collections==1.1.0 tensorboardX==2.6.5
  tokamax==0.0.12 qwix==0.1.8 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typeguard==2.13.3 einshape==1.0 immutabledict==4.3.1
  jaxtyping==0.3.11 wadler-lindig==0.1.8 tqdm==4.70.1
)
mkdir -p .whl
for package in "${packages[@]}"; do
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --implementation cp --no-deps --dest .whl "$package"
done
du -ch .whl/*.whl | tail -1
