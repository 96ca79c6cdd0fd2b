"""The device mesh, and the one place where logical axis names become mesh axes.

Mesh axes: `data` and `expert`. Tokens (the batch) are split over both, so expert
parallelism is data parallelism for every non-expert weight; expert weights and their
optimizer state are split over `expert`; all other weights are replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain.config import ConfigError
from moetrain.parallel import ragged

AXES = ('data', 'expert')
BATCH_AXES = ('data', 'expert')  # mesh axes the tokens are split over.

# Logical axis name (as written on each parameter) -> mesh axis (None: replicated).
LOGICAL_RULES = {
    'expert': 'expert',
    'batch': BATCH_AXES,
    'embed': None,
    'mlp': None,
    'heads': None,
    'head_dim': None,
    'vocab': None,
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """(data, expert) sizes from the config; one -1 entry takes the remaining devices."""
  sizes = [mesh_cfg.data, mesh_cfg.expert]
  if sizes.count(-1) > 1:
    raise ConfigError('only one of mesh.data and mesh.expert may be -1; give the other a '
                      'size.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh.expert={mesh_cfg.expert} does not divide the {num_devices} '
                        'devices; choose a divisor of the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh data={sizes[0]} x expert={sizes[1]} = {math.prod(sizes)} '
                      f'devices, but {num_devices} are present; make the product equal the '
                      'device count (or set one axis to -1).')
  return tuple(sizes)


def check(cfg, num_devices: int) -> tuple[int, int]:
  """Mesh checks that need the device count; raises ConfigError before any compile."""
  data, expert = mesh_shape(cfg.mesh, num_devices)
  if cfg.model.num_experts and cfg.model.num_experts % expert:
    raise ConfigError(f'model.num_experts={cfg.model.num_experts} is not divisible by '
                      f'mesh.expert={expert}; choose an expert axis that divides it.')
  if cfg.model.num_experts == 0 and expert > 1:
    raise ConfigError(f'mesh.expert={expert} needs a MoE model, but model.num_experts=0; '
                      'set mesh.expert=1 for a dense model.')
  if cfg.data.batch_size % (data * expert):
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by the '
                      f'{data * expert} devices the batch is split over (data x expert); '
                      'choose a multiple.')
  moe = cfg.model.moe
  if (cfg.model.num_experts and expert > 1 and moe.dropless and moe.dropless_impl == 'ragged'
      and not ragged.backend_supports_ragged_all_to_all()):
    raise ConfigError(
        f"model.moe.dropless_impl='ragged' with mesh.expert={expert} needs "
        f'jax.lax.ragged_all_to_all, which the {jax.default_backend()} backend lacks; set '
        "dropless_impl='auto' (padded all-to-all here) or 'padded'.")
  return data, expert


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, expert) mesh over `devices` (all devices by default)."""
  devices = jax.devices() if devices is None else devices
  shape = check(cfg, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_to_spec(axes) -> P:
  """PartitionSpec for a tuple of logical axis names."""
  return P(*(LOGICAL_RULES[a] if a is not None else None for a in axes))


def state_shardings(state, mesh):
  """NamedShardings for an nnx.State whose Variables carry logical `axes` metadata.

  Variables without `axes` (and scalars) are replicated.
  """
  from flax import nnx

  def sharding(v):
    axes = v.get_metadata().get('axes') if isinstance(v, nnx.Variable) else None
    spec = logical_to_spec(axes) if axes else P()
    return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else \
        NamedSharding(mesh, spec)

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch: B split over the token axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))
