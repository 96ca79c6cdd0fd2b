"""Ahead-of-time compile of the train step: for a TPU topology from any host (through
libtpu's compile-only devices), or for the local devices; a per-chip report of memory,
FLOPs and collectives.

`moetrain compile --config=FILE [--topology=v5p-128] [--num_slices=N]` lowers and compiles
the very function `moetrain train` jits (`step.jit_train_step`, state donated) on
abstract inputs with the config's shardings, so nothing is allocated and no TPU is
needed. XLA's compile-time HBM check raises when the step does not fit; the command then
exits with one sentence naming what to change.

Topology names: v4-N and v5p-N count TensorCores (2 per chip, as Cloud TPU names them:
v5p-128 is 64 chips, a 4x4x4 torus); v5e-N (v5litepod-N) and v6e-N count chips. A raw
libtpu name such as 'v5p:4x4x4' works too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import backend, counting
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain.model import attention
from moetrain.parallel import mesh as mesh_lib

GIB = 1024 ** 3
# Usable HBM per chip (GiB) as XLA's compile-time check reports it ("exceeds available
# HBM (95.73G)"), by device kind.
HBM_GIB = {'TPU v4': 30.75, 'TPU v5 lite': 15.75, 'TPU v5': 95.73, 'TPU v6 lite': 31.24}
# Slice name prefix -> (libtpu topology prefix, torus dimensions, TensorCores per chip in
# the name).
GENERATIONS = {'v4': ('v4', 3, 2), 'v5p': ('v5p', 3, 2), 'v5e': ('v5e', 2, 1),
               'v5litepod': ('v5e', 2, 1), 'v6e': ('v6e', 2, 1)}
COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'reduce-scatter',
               'all-reduce', 'collective-permute')


class DoesNotFitError(RuntimeError):
  """The train step needs more memory per chip than it has; the message says what to
  change."""


def torus(chips: int, ndim: int) -> tuple[int, ...]:
  """The chip grid of a slice of `chips` (a power of two): 3-d as Cloud TPU shapes v4 and
  v5p slices (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...), 2-d as v5e/v6e (1x1, 1x2,
  2x2, 2x4, 4x4, 4x8, ...)."""
  dims = [1] * ndim
  order = [0, 1, 2] if ndim == 3 else [1, 0]
  cycle = [2, 1, 0] if ndim == 3 else [1, 0]
  for i in range(int(math.log2(chips))):
    axis = order[i] if i < len(order) else cycle[(i - len(order)) % len(cycle)]
    dims[axis] *= 2
  return tuple(dims)


def topology_name(name: str) -> tuple[str, str]:
  """A slice name ('v5p-128', 'v5e-16', ...) or libtpu name ('v5p:4x4x4') -> (libtpu
  topology name, generation key of GENERATIONS)."""
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)[-:](\S+)', name)
  if not match:
    raise config_lib.ConfigError(
        f'--topology={name!r} is not a TPU slice name; use e.g. v5p-128, v4-32, v5e-16, '
        'v6e-64 or a libtpu name such as v5p:4x4x4.')
  generation, size = match.groups()
  prefix, ndim, cores = GENERATIONS[generation]
  if ':' in name:
    return f'{prefix}:{size}', generation
  count = int(size) if size.isdigit() else 0
  chips = count // cores
  if chips < 1 or count % cores or chips & (chips - 1):
    raise config_lib.ConfigError(
        f'--topology={name!r} is not a slice size this knows (a power of two '
        f'{"TensorCores, 2 per chip" if cores == 2 else "chips"}); use e.g. '
        f'{generation}-{8 * cores} or a libtpu name such as {prefix}:2x2x2.')
  return f'{prefix}:' + 'x'.join(map(str, torus(chips, ndim))), generation


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only TPU devices (one per chip) of `num_slices` slices of topology `name`."""
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - old jax
    raise config_lib.ConfigError(f'--topology needs jax.experimental.topologies ({e}); '
                                 "install the TPU extra: pip install -e '.[tpu]'.") from e
  libtpu_name, generation = topology_name(name)
  kwargs = dict(chip_config_name='megacore') if GENERATIONS[generation][1] == 3 else {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=libtpu_name,
                                             **kwargs).devices)
  except Exception as e:  # noqa: BLE001 -- libtpu missing or the name unknown to it.
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise config_lib.ConfigError(
        f'libtpu gave no TPU topology {libtpu_name!r} ({first}); check that libtpu is '
        "installed (pip install -e '.[tpu]', Python >= 3.12), that no other process is "
        'using it, and the --topology name.') from e


def abstract_batch(cfg, sharding) -> dict:
  """ShapeDtypeStructs of one training batch as the data pipeline builds it."""
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = dict(inputs=spec(jnp.int32), targets=spec(jnp.int32), mask=spec(jnp.float32))
  if cfg.data.document_mask:
    batch.update(segment_ids=spec(jnp.int32), positions=spec(jnp.int32))
  return batch


def count_collectives(hlo_text: str) -> dict:
  """How many of each collective the compiled HLO holds (an async start/done pair counts
  once; an op inside a loop body, e.g. a scanned layer, counts once)."""
  ops = re.findall(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(', hlo_text)
  return {name: ops.count(name) for name in COLLECTIVES}


@dataclasses.dataclass
class Report:
  """What one ahead-of-time compile measured, per chip (device)."""
  target: str
  device_kind: str
  num_devices: int
  mesh: dict
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hbm_bytes: int | None
  model_flops_per_step: float
  xla_flops_per_device: float | None
  collectives: dict
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """Arguments + outputs - donated outputs that reuse argument buffers + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def fits(self) -> bool:
    return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    size = lambda n: (f'{n / GIB:8.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:8.2f} MiB')
    hbm = (f'{size(self.hbm_bytes)}  ({100 * self.total_bytes / self.hbm_bytes:.0f}% used)'
           if self.hbm_bytes else '     n/a')
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    xla = (f'{self.xla_flops_per_device / 1e12:8.2f} TFLOP' if self.xla_flops_per_device
           else '     n/a')
    return [
        f'train step compiled for {self.target}: {self.num_devices} x {self.device_kind}, '
        f'mesh {mesh} ({self.compile_seconds:.0f} s)',
        'per chip:',
        f'  arguments (state, batch)   {size(self.argument_bytes)}',
        f'  outputs not aliased        {size(self.output_bytes - self.alias_bytes)}',
        f'  temporaries                {size(self.temp_bytes)}',
        f'  total                      {size(self.total_bytes)}  '
        f'({self.total_bytes / 1e9:.2f} GB)',
        f'  HBM                        {hbm}',
        f'  model FLOPs per step       '
        f'{self.model_flops_per_step / self.num_devices / 1e12:8.2f} TFLOP  '
        f'({self.model_flops_per_step / 1e15:.2f} PFLOP on all chips)',
        f'  XLA cost analysis          {xla}  (a scanned loop body counts once)',
        'collectives in the program (a scanned layer counts once):',
        '  ' + ', '.join(f'{name} {n}' for name, n in self.collectives.items())]


def prepare(cfg, num_devices: int, platform: str):
  """Validation for a compile target: the config checks, the mesh against its device
  count and the attention kernel against its platform (ConfigError before compiling)."""
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  mesh_lib.check(cfg, num_devices)
  attention.choose_impl(cfg.model.attention_impl, seq_len=cfg.data.seq_len,
                        dtype=cfg.model.dtype, platform=platform)
  return cfg


def abstract_step(cfg, mesh):
  """The jitted train step and its abstract, sharded inputs (state, batch): nothing
  allocated, the model built once under `jax.eval_shape`."""
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, abstract, shardings = state_lib.abstract_state(cfg, mesh, tx)
  state = state_lib.restore_target(abstract, shardings)
  batch = abstract_batch(cfg, mesh_lib.batch_sharding(mesh))
  return step_lib.jit_train_step(graphdef, tx, cfg, shardings), (state, batch)


def lower(cfg, mesh):
  """The jitted train step lowered on abstract, sharded inputs (nothing allocated)."""
  step, inputs = abstract_step(cfg, mesh)
  with jax.set_mesh(mesh):
    return step.lower(*inputs)


def _hbm_bytes(device) -> int | None:
  if device.device_kind in HBM_GIB:
    return int(HBM_GIB[device.device_kind] * GIB)
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- compile-only or CPU devices have none.
    stats = None
  return stats.get('bytes_limit') if stats else None


def _fix(cfg) -> str:
  """What to change when the step does not fit, given the config."""
  m = cfg.model
  steps = []
  if m.remat != 'full':
    steps.append("model.remat='full'")
  if not m.scan_layers:
    steps.append('model.scan_layers=True')
  if not m.loss_chunk:
    steps.append('model.loss_chunk (e.g. 512)')
  steps.append('a larger mesh.fsdp')
  steps.append('more train.grad_accum_steps (or a smaller data.batch_size)')
  return ', '.join(steps)


def compile_step(cfg, topology: str | None = None, num_slices: int = 1,
                 devices=None, dump: str | None = None) -> tuple[Report, object]:
  """Compiles the train step of `cfg` for `topology` (TPU, compile-only) or for `devices`
  (default: the local ones). Returns (Report, the jax Compiled object). `dump`: a
  directory for XLA's dump of the compiled program (HLO, buffer assignment and, on TPU,
  a memory-usage report listing the largest buffers).

  Raises ConfigError for a bad config or topology and DoesNotFitError when XLA's
  compile-time HBM check fails.
  """
  if topology:
    devices = topology_devices(topology, num_slices)
    target = topology + (f' x {num_slices} slices' if num_slices > 1 else '')
  else:
    devices = list(jax.devices() if devices is None else devices)
    target = f'the local {devices[0].platform} devices'
  platform = devices[0].platform
  with backend.target(platform):
    cfg = prepare(cfg, len(devices), platform)
    mesh = mesh_lib.make_mesh(cfg, devices)
    start = time.perf_counter()
    lowered = lower(cfg, mesh)
    try:
      options = {'xla_dump_to': str(dump), 'xla_dump_hlo_pass_re': 'NONE'} if dump else {}
      compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 -- XLA raises a generic error type.
      found = re.search(r'memory required for (.*?) \(([\d.]+\w?)\) exceeds available HBM '
                        r'\(([\d.]+\w?)\)', str(e))
      if not found and 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      need = (f'{found.group(1)} need {found.group(2)}iB of the {found.group(3)}iB of HBM '
              'per chip' if found else 'it needs more HBM than a chip has')
      raise DoesNotFitError(
          f'the train step does not fit on {target}: {need}; set {_fix(cfg)}.') from e
    seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  counts = counting.count(cfg)
  report = Report(
      target=target, device_kind=devices[0].device_kind, num_devices=len(devices),
      mesh=dict(mesh.shape), argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, hbm_bytes=_hbm_bytes(devices[0]),
      model_flops_per_step=counts.flops_per_token * cfg.data.batch_size * cfg.data.seq_len,
      xla_flops_per_device=(cost or {}).get('flops'),
      collectives=count_collectives(compiled.as_text()), compile_seconds=seconds)
  if not report.fits():
    raise DoesNotFitError(
        f'the train step does not fit on {target}: it needs {report.total_bytes / GIB:.2f} '
        f'GiB of the {report.hbm_bytes / GIB:.2f} GiB of memory per device; set '
        f'{_fix(cfg)}.')
  return report, compiled


def state_bytes(cfg, mesh) -> int:
  """Bytes of the whole train state (parameters, optimizer moments, ...), unsharded."""
  abstract = state_lib.abstract_state(cfg, mesh, optimizer_lib.make_optimizer(cfg.train))[1]
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract))
