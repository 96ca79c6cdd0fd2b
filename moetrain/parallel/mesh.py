"""The device mesh, and the one place where logical axis names become mesh axes.

Mesh axes: `data`, `fsdp` and `expert`. Tokens (the batch) are split over all three, so
each axis is data parallelism for the activations. Weights and their optimizer moments
are split along their model dimension (`embed`) over `fsdp` (ZeRO-3 style: a layer's
weights are all-gathered just before it runs and its gradients reduce-scattered); expert
stacks [E, D, F] are stored as [E/ep, D/fsdp, F] per device; every other weight is split
over `fsdp` x `expert`, since the expert axis holds the same copy of it. `data`
replicates the weights (plain data parallelism).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain import backend
from moetrain.config import ConfigError
from moetrain.parallel import ragged

AXES = ('data', 'fsdp', 'expert')
BATCH_AXES = ('data', 'fsdp', 'expert')  # mesh axes the tokens are split over.

# Logical axis name (as written on each parameter) -> the mesh axes its dimension is split
# over, in order of preference (empty: replicated). A mesh axis serves one dimension of a
# weight: dimensions with one candidate claim theirs first, so an expert stack
# ('expert', 'embed', 'mlp') is split [expert, fsdp, -] while a non-expert weight's
# 'embed' takes fsdp and expert ([fsdp x expert, -]): ZeRO-3 over every device that holds
# the same copy. Later candidates only extend the first one's split: with mesh.fsdp=1
# non-expert weights stay replicated (plain expert parallelism). A dimension that the
# axes do not divide keeps the longest prefix of candidates that does. 'layers' leads the
# stacks of scanned layers.
LOGICAL_RULES = {
    'expert': ('expert',),
    'embed': ('fsdp', 'expert'),
    'mlp': (),
    'heads': (),
    'head_dim': (),
    'vocab': (),
    'layers': (),
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, expert) sizes from the config; one -1 entry takes the remaining devices."""
  sizes = [mesh_cfg[a] for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError('only one of mesh.data, mesh.fsdp and mesh.expert may be -1; give the '
                      'others a size.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      named = [f'mesh.{a}={s}' for a, s in zip(AXES, sizes) if s not in (-1, 1)]
      given = ' x '.join(named) + (f' = {known}' if len(named) > 1 else '')
      raise ConfigError(f'{given} does not divide the {num_devices} devices; choose sizes '
                        'whose product divides the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    given = ' x '.join(f'{a}={s}' for a, s in zip(AXES, sizes))
    raise ConfigError(f'mesh {given} = {math.prod(sizes)} devices, but {num_devices} are '
                      'present; make the product equal the device count (or set one axis '
                      'to -1).')
  return tuple(sizes)


def check(cfg, num_devices: int) -> tuple[int, int, int]:
  """Mesh checks that need the device count; raises ConfigError before any compile."""
  data, fsdp, expert = mesh_shape(cfg.mesh, num_devices)
  if cfg.model.num_experts and cfg.model.num_experts % expert:
    raise ConfigError(f'model.num_experts={cfg.model.num_experts} is not divisible by '
                      f'mesh.expert={expert}; choose an expert axis that divides it.')
  if cfg.model.num_experts == 0 and expert > 1:
    raise ConfigError(f'mesh.expert={expert} needs a MoE model, but model.num_experts=0; '
                      'set mesh.expert=1 for a dense model.')
  if cfg.model.d_model % fsdp:
    raise ConfigError(f'model.d_model={cfg.model.d_model} is not divisible by '
                      f'mesh.fsdp={fsdp} (weights are split over fsdp along d_model); '
                      'choose an fsdp size that divides d_model.')
  devices = data * fsdp * expert
  micro = cfg.train.grad_accum_steps
  if cfg.data.batch_size % (devices * micro):
    per = f' x train.grad_accum_steps={micro} micro-batches' if micro > 1 else ''
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by the '
                      f'{devices} devices the batch is split over (data x fsdp x expert)'
                      f'{per}; choose a multiple of {devices * micro}.')
  moe = cfg.model.moe
  tokens = cfg.data.batch_size * cfg.data.seq_len // (devices * micro)
  if cfg.model.num_experts and moe.expert_chunk and tokens % moe.expert_chunk:
    raise ConfigError(f'model.moe.expert_chunk={moe.expert_chunk} does not divide the '
                      f'{tokens} tokens each device routes per step (data.batch_size x '
                      'data.seq_len / devices / micro-batches); choose a divisor.')
  ragged_key = ("dropless_impl='ragged'" if moe.dropless_impl == 'ragged' else
                "grouped_matmul='tokamax'" if moe.grouped_matmul == 'tokamax' else None)
  if (cfg.model.num_experts and expert > 1 and moe.dropless and ragged_key
      and not ragged.backend_supports_ragged_all_to_all()):
    fix = ("dropless_impl='auto' (padded all-to-all here) or 'padded'"
           if moe.dropless_impl == 'ragged' else "grouped_matmul='xla'")
    raise ConfigError(
        f'model.moe.{ragged_key} with mesh.expert={expert} needs '
        f'jax.lax.ragged_all_to_all, which the {backend.name()} backend lacks; set {fix}.')
  return data, fsdp, expert


def device_grid(devices, shape) -> np.ndarray:
  """`devices` arranged as a (data, fsdp, expert) array of `shape`.

  TPU: laid out on the physical torus by `mesh_utils` (neighbours share the inner axes);
  with several slices (multi-slice, over the data-center network) `data` spans the slices,
  so only data-parallel gradient reductions cross between them. Elsewhere: in order.
  """
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if devices[0].platform != 'tpu':
    return np.asarray(devices).reshape(shape)
  from jax.experimental import mesh_utils
  if len(slices) == 1:
    return mesh_utils.create_device_mesh(shape, devices=devices,
                                         allow_split_physical_axes=True)
  if shape[0] % len(slices):
    raise ConfigError(f'mesh.data={shape[0]} must be a multiple of the {len(slices)} '
                      'slices (data parallelism runs across slices); choose mesh.data '
                      'accordingly.')
  dcn = (len(slices), 1, 1)
  ici = (shape[0] // len(slices), shape[1], shape[2])
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                              allow_split_physical_axes=True)


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, expert) mesh over `devices` (all devices by default)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = check(cfg, len(devices))
  return jax.sharding.Mesh(device_grid(devices, shape), AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_to_spec(axes, shape=None, mesh_sizes=None) -> P:
  """PartitionSpec for a tuple of logical axis names (None: replicated), by LOGICAL_RULES.

  With the array's `shape` and the mesh's axis sizes (`mesh_sizes`, e.g. `mesh.shape`),
  a dimension whose first candidate axis has size 1 is not split, and otherwise keeps the
  longest prefix of its candidate axes whose sizes divide it.
  """
  order = sorted(range(len(axes)), key=lambda i: len(LOGICAL_RULES[axes[i]]) if axes[i] else 0)
  taken, entries = set(), [None] * len(axes)
  for i in order:
    candidates = [a for a in (LOGICAL_RULES[axes[i]] if axes[i] else ()) if a not in taken]
    if mesh_sizes is not None and candidates and mesh_sizes[candidates[0]] == 1:
      candidates = []  # the later candidates extend the first one's split, never alone
    if shape is not None and mesh_sizes is not None:
      while candidates and shape[i] % math.prod(mesh_sizes[a] for a in candidates):
        candidates.pop()
    taken.update(candidates)
    entries[i] = (candidates[0] if len(candidates) == 1 else tuple(candidates)) \
        if candidates else None
  return P(*entries)


def state_shardings(state, mesh):
  """NamedShardings for an nnx.State whose Variables carry logical `axes` metadata.

  Variables without `axes` (and scalars) are replicated.
  """
  from flax import nnx

  def sharding(v):
    axes = v.get_metadata().get('axes') if isinstance(v, nnx.Variable) else None
    spec = logical_to_spec(axes, v.get_value().shape, mesh.shape) if axes else P()
    return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else \
        NamedSharding(mesh, spec)

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch: B split over the token axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def current_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is none or it has one device
  (then the code runs as on one device: no sharding constraints, no shard_map)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return mesh


def gather(w, spec: P):
  """The weight `w`, stored split as `spec`, whole on every device of the current mesh
  (a no-op without one): FSDP's just-in-time all-gather where the weight is used. Its
  gradient is constrained back to `spec`, so the backward pass reduce-scatters it
  (a plain sharding constraint would all-reduce the whole gradient, then slice it)."""
  if current_mesh() is None:
    return w
  return _gather(w, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather(w, spec):
  del spec
  return jax.lax.with_sharding_constraint(w, P())


def _gather_fwd(w, spec):
  return _gather(w, spec), None


def _gather_bwd(spec, _, g):
  return (jax.lax.with_sharding_constraint(g, spec),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def constrain_batch(x, batch_dim: int = 0):
  """x constrained to be split over the token axes along `batch_dim` on the current mesh
  (a no-op without one): pins activations to the batch sharding, so GSPMD gathers the
  fsdp-split weights rather than moving activations."""
  if current_mesh() is None:
    return x
  spec = [None] * x.ndim
  spec[batch_dim] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, P(*spec))


def gather_fsdp(w, spec: P):
  """Inside shard_map: the local slice `w` all-gathered over the `fsdp` mesh axis along
  the dimension that `spec` splits over it (unchanged when fsdp has size 1)."""
  names = lambda entry: entry if isinstance(entry, tuple) else (entry,)
  dims = [i for i, entry in enumerate(spec) if 'fsdp' in names(entry)]
  if jax.lax.axis_size('fsdp') == 1 or not dims:
    return w
  return jax.lax.all_gather(w, 'fsdp', axis=dims[0], tiled=True)
