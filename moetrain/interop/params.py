"""A run's parameters as a flat dict of NumPy arrays, keyed by module path
('blocks.0.attn.w_q', 'blocks.1.ffn.w_gate', 'embed', ...), and back into nnx state.

This is the common currency of export, import, warm starts and upcycling: pure functions
map one flat dict to another, and only these helpers know how nnx and the checkpoints
spell the keys (a `params.` prefix, a `.value` suffix) and how `model.scan_layers` stores
the blocks: run R's unit layer J stacked over the run's repetitions
('runs.R.units.J.attn.w_q' [repeats, ...]). The flat dicts always hold one entry per
layer ('blocks.N....'), whichever way the run stored them, so a scanned run exports,
warm-starts and upcycles exactly as the unscanned run with the same weights.
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


def _scanned_key(key: str):
  """'runs.R.units.J.rest' -> (R, J, rest); None for any other key."""
  parts = key.split('.', 4)
  if len(parts) == 5 and parts[0] == 'runs' and parts[2] == 'units':
    return int(parts[1]), int(parts[3]), parts[4]
  return None


def _run_layers(shapes: dict[str, tuple]) -> dict[tuple[int, int], list[int]]:
  """{(R, J): the layer of each repetition of run R's unit layer J}, from the stored
  shapes of a scanned model (runs in order, unit size = number of J, repeats = the
  leading axis)."""
  units, repeats = {}, {}
  for key, shape in shapes.items():
    parsed = _scanned_key(key)
    if parsed:
      units.setdefault(parsed[0], set()).add(parsed[1])
      repeats[parsed[0]] = shape[0]
  layers, start = {}, 0
  for r in sorted(units):
    u = len(units[r])
    for j in range(u):
      layers[r, j] = [start + rep * u + j for rep in range(repeats[r])]
    start += u * repeats[r]
  return layers


def unstack_layers(flat: dict) -> dict:
  """A flat dict with scanned runs -> one entry per layer ('blocks.N.rest'); a flat dict
  without them is returned as it is."""
  layers = _run_layers({k: v.shape for k, v in flat.items()})
  out = {}
  for key, value in flat.items():
    parsed = _scanned_key(key)
    if parsed is None:
      out[key] = value
      continue
    r, j, rest = parsed
    for rep, layer in enumerate(layers[r, j]):
      out[f'blocks.{layer}.{rest}'] = value[rep]
  return out


def to_flat(params_state) -> dict[str, np.ndarray]:
  """nnx.State of parameters (arrays) -> {'blocks.0.attn.w_q': np.ndarray, ...}, one entry
  per layer also for a scanned model."""
  return unstack_layers({_strip(k): np.asarray(v)
                         for k, v in checkpoint_lib.flatten(params_state).items()})


def shapes(params_state) -> dict[str, tuple]:
  """nnx.State of parameters (arrays or ShapeDtypeStructs) -> {key: shape}."""
  return {_strip(k): tuple(v.shape) for k, v in checkpoint_lib.flatten(params_state).items()}


def _stacked(flat: dict, key: str, layers: list[int] | None):
  """The array `key` of a target from `flat`: a scanned key's per-layer entries stacked
  over its repetitions (None when one is missing)."""
  if key in flat or layers is None:
    return flat.get(key)
  rest = _scanned_key(key)[2]
  per_layer = [flat.get(f'blocks.{layer}.{rest}') for layer in layers]
  if any(a is None for a in per_layer) or len({np.shape(a) for a in per_layer}) > 1:
    return None
  return np.stack([np.asarray(a) for a in per_layer])


def from_flat(target_state, flat: dict):
  """The inverse of `to_flat` into the structure of `target_state` (an nnx.State whose
  leaves may be arrays or ShapeDtypeStructs; a scanned model's runs are stacked from the
  per-layer entries); each array takes the target leaf's dtype."""
  leaves = checkpoint_lib.flatten(target_state)
  layers = _run_layers({_strip(k): leaf.shape for k, leaf in leaves.items()})
  arrays = {}
  for key, leaf in leaves.items():
    parsed = _scanned_key(_strip(key))
    array = _stacked(flat, _strip(key), parsed and layers[parsed[:2]])
    if array is None or tuple(array.shape) != tuple(leaf.shape):
      has = 'missing' if array is None else f'of shape {tuple(array.shape)}'
      raise config_lib.ConfigError(
          f'parameter {_strip(key)} is {has}, but the config builds it with shape '
          f'{tuple(leaf.shape)}; the model keys do not describe these weights.')
    arrays[key] = np.asarray(array).astype(leaf.dtype)
  return checkpoint_lib.unflatten_like(target_state, arrays)


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
      return step, unstack_layers({_strip(k): v for k, v in arrays.items()
                                   if k.startswith(_PREFIX)})
    raise checkpoint_lib.CheckpointError(
        f'no checkpoint in {checkpointer.directory} can be read ({"; ".join(causes)}); '
        'resume the run with `moetrain train` to set damaged ones aside.')
  finally:
    checkpointer.manager.close()
