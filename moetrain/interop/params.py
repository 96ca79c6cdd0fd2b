"""A run's parameters as a flat dict of NumPy arrays, keyed by module path
('blocks.0.attn.w_q', 'blocks.1.ffn.w_gate', 'embed', ...), and back into nnx state.

This is the common currency of export, import, warm starts and upcycling: pure functions
map one flat dict to another, and only these helpers know how nnx and the checkpoints
spell the keys (a `params.` prefix, a `.value` suffix).
"""

from __future__ import annotations

import json

import numpy as np

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import paths

_PREFIX, _SUFFIX = 'params.', '.value'


def _strip(key: str) -> str:
  key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
  return key[:-len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def to_flat(params_state) -> dict[str, np.ndarray]:
  """nnx.State of parameters (arrays) -> {'blocks.0.attn.w_q': np.ndarray, ...}."""
  return {_strip(k): np.asarray(v) for k, v in checkpoint_lib.flatten(params_state).items()}


def shapes(params_state) -> dict[str, tuple]:
  """nnx.State of parameters (arrays or ShapeDtypeStructs) -> {key: shape}."""
  return {_strip(k): tuple(v.shape) for k, v in checkpoint_lib.flatten(params_state).items()}


def from_flat(target_state, flat: dict):
  """The inverse of `to_flat` into the structure of `target_state` (an nnx.State whose
  leaves may be arrays or ShapeDtypeStructs); each array takes the target leaf's dtype."""
  leaves = checkpoint_lib.flatten(target_state)
  for key, leaf in leaves.items():
    array = flat.get(_strip(key))
    if array is None or tuple(array.shape) != tuple(leaf.shape):
      has = 'missing' if array is None else f'of shape {tuple(array.shape)}'
      raise config_lib.ConfigError(
          f'parameter {_strip(key)} is {has}, but the config builds it with shape '
          f'{tuple(leaf.shape)}; the model keys do not describe these weights.')
  return checkpoint_lib.unflatten_like(target_state, {
      k: np.asarray(flat[_strip(k)]).astype(leaf.dtype) for k, leaf in leaves.items()})


def run_config(workdir):
  """The resolved config a run saved in WORKDIR/config.json."""
  path = paths.path(workdir) / 'config.json'
  if not paths.is_file(path):
    raise config_lib.ConfigError(f'{workdir} has no config.json; pass the --workdir of a '
                                 'training run (or of `moetrain import`).')
  return config_lib.from_dict(json.loads(paths.read_text(path)))


def newest_params(workdir) -> tuple[int, dict[str, np.ndarray]]:
  """(step, flat parameters) of the newest checkpoint of `workdir` that reads back.

  Only reads: a damaged checkpoint is skipped, never moved (training does that).
  """
  if not paths.is_dir(paths.path(workdir) / 'checkpoints'):
    raise config_lib.ConfigError(f'{workdir} has no checkpoint yet; train it first.')
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise config_lib.ConfigError(f'{workdir} has no checkpoint yet; train it first.')
    causes = []
    for step in reversed(steps):
      try:
        arrays = checkpointer.read_arrays(step)
      except Exception as e:  # noqa: BLE001 -- any failure to read means damage.
        causes.append(f'step {step}: {type(e).__name__}')
        continue
      return step, {_strip(k): v for k, v in arrays.items() if k.startswith(_PREFIX)}
    raise checkpoint_lib.CheckpointError(
        f'no checkpoint in {checkpointer.directory} can be read ({"; ".join(causes)}); '
        'resume the run with `moetrain train` to set damaged ones aside.')
  finally:
    checkpointer.manager.close()
