"""Checkpoints with orbax: the train state as a flat dict of arrays, plus JSON metadata
(config, data iterator position, array shapes).

Guarantees:
- saves are async and atomic (orbax writes a temporary folder and renames it when done;
  a save cut short leaves only an ignored `*.orbax-checkpoint-tmp-*` folder);
- every array's checksum (moetrain.checksum, independent of the mesh) is saved in the
  metadata and verified on every read, so silent corruption (a flipped bit) is damage;
- a damaged checkpoint is never deleted: `restore_latest` moves damaged steps newer than
  the one it restores to `checkpoints.damaged/` and says so with a warning;
- retention (`keep`) is ours, not orbax's `max_to_keep`: old steps are deleted only after
  the newest one has been read back in full, so the only valid checkpoint is never lost,
  and the last good one the divergence guard recorded in the newest checkpoint's metadata
  (meta['guard']['last_good']) is kept beside the newest `keep`.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from moetrain import checksum
from moetrain import paths
from moetrain import workdir as workdir_lib

# Config keys that decide the shapes (or dtypes) of the saved arrays.
SHAPE_KEYS = (
    'model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
    'model.num_kv_heads', 'model.d_ff', 'model.num_experts', 'model.moe_every',
    'model.first_k_dense', 'model.tie_embeddings', 'model.param_dtype',
    'model.moe.router', 'model.moe.d_expert', 'model.moe.num_shared_experts',
    'model.moe.bias_update_rate', 'model.moe.gate', 'model.scan_layers',
    'model.head_dim', 'model.qk_norm', 'model.qkv_bias', 'model.moe.shared_expert_gate',
)


class CheckpointError(RuntimeError):
  """A checkpoint folder that cannot be resumed from; the message says what to do."""


class DamagedCheckpointWarning(UserWarning):
  """A checkpoint step that could not be read; it is kept aside, never deleted."""


class ChecksumMismatch(ValueError):
  """An array read back differs from the checksum saved with it."""


def verify(checksums: dict, saved: dict | None):
  """Raises ChecksumMismatch naming the arrays whose `checksums` differ from `saved`
  (the meta['checksums'] of a checkpoint; None in checkpoints of older versions)."""
  if saved is None:
    return
  bad = sorted(k for k, v in checksums.items() if saved.get(k) != v)
  if bad:
    raise ChecksumMismatch(f'{", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""} '
                           'differ from their saved checksums')


def flatten(tree) -> dict:
  """Pytree -> {'params.blocks.0.attn.w_q': array, ...} (keys from the tree paths)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(_key(k) for k in path): leaf for path, leaf in leaves}


def unflatten_like(target, flat: dict):
  """Inverse of `flatten`, given a pytree with the same structure."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree_util.tree_unflatten(
      treedef, [flat['.'.join(_key(k) for k in path)] for path, _ in paths])


def _key(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def shapes_of(tree) -> dict:
  """{flat key: [shape list, dtype name]} of a pytree of arrays or ShapeDtypeStructs."""
  return {k: [list(v.shape), np.dtype(v.dtype).name] for k, v in flatten(tree).items()}


def _flat_config(config: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flat_config(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_compatible(meta: dict, config: dict, shapes: dict, step: int):
  """Raises CheckpointError (one sentence naming the config keys) when the arrays that
  `config` (a JSON dict) builds, with `shapes` as from `shapes_of`, differ from the ones
  saved at `step` with `meta`."""
  saved_shapes = meta.get('shapes')  # absent in checkpoints of older versions.
  if saved_shapes == shapes:
    return
  old, new = _flat_config(meta.get('config', {})), _flat_config(config)
  keys = [k for k in SHAPE_KEYS if old.get(k) != new.get(k)]
  if saved_shapes is None and not keys:
    return
  if keys:
    diff = ', '.join(f'{k}={old.get(k)!r} (config has {new.get(k)!r})' for k in keys)
    raise CheckpointError(
        f'the checkpoint at step {step} was saved with {diff}, so its arrays do not fit '
        'this config; set these keys back to the saved values or choose a new --workdir.')
  names = sorted(k for k in set(saved_shapes or {}) | set(shapes)
                 if saved_shapes.get(k) != shapes.get(k))
  raise CheckpointError(
      f'the checkpoint at step {step} holds arrays that this config builds differently '
      f'({", ".join(names[:5])}{", ..." if len(names) > 5 else ""}); use the config it '
      'was saved with (config.json in the workdir) or choose a new --workdir.')


class Checkpointer:
  """An orbax CheckpointManager in `workdir/checkpoints` with fallback and safe retention.

  A checkpoint has two items: `state` (flat dict of arrays) and `meta` (JSON: config,
  data iterator position, array shapes). `workdir` is a local folder or a gs:// one.
  """

  def __init__(self, workdir, keep: int = 3):
    self.workdir = paths.absolute(workdir)
    self.directory = self.workdir / 'checkpoints'
    self.damaged_directory = self.workdir / 'checkpoints.damaged'
    self.keep = keep
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # max_to_keep=None: orbax never deletes; `prune` does, after a read-back check.
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

  def steps(self) -> list[int]:
    """Committed steps, ascending (damaged ones included: damage shows only on read)."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False):
    """Starts an async save of `state` (a pytree of arrays) and `meta` (JSON-able).

    Waits for the previous save and prunes old steps first; raises OSError(ENOSPC) when
    the disk has no room for another checkpoint the size of the newest. The arrays are
    copied to host memory before this returns, so the caller may then donate them.
    """
    self.manager.wait_until_finished()
    self.prune()
    steps = self.steps()
    if steps and not paths.is_cloud(self.directory):
      # room for another one the size of the newest, or stop before writing.
      workdir_lib.check_room(self.directory, workdir_lib.tree_bytes(self.directory /
                                                                     str(steps[-1])))
    flat = flatten(state)
    meta = dict(meta, shapes=shapes_of(state), checksums=checksum.device_checksums(flat))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved at `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target):
    """Restores the state at `step` into the structure (and shardings) of `target`, whose
    leaves may be arrays or jax.ShapeDtypeStruct. Returns (state, meta)."""
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, 'sharding', None))
                for k, v in flatten(target).items()}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    verify(checksum.device_checksums(out['state']), out['meta'].get('checksums'))
    return unflatten_like(target, out['state']), out['meta']

  def read_arrays(self, step: int) -> dict:
    """The arrays saved at `step` as a flat dict of NumPy arrays (any mesh, one host)."""
    meta = self.read_meta(step)
    device = SingleDeviceSharding(jax.local_devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=device)
                for k, (shape, dtype) in meta['shapes'].items()}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    arrays = {k: np.asarray(v) for k, v in out.items()}
    verify({k: checksum.numpy_checksum(v) for k, v in arrays.items()}, meta.get('checksums'))
    return arrays

  def restore_latest(self, target, check=None, warn=True, move_damaged=True):
    """Restores the newest step that reads back, falling back past damaged ones.

    `check(meta, step)` may raise to reject a readable checkpoint (e.g. a config whose
    shapes differ); its error propagates. Damaged steps newer than the restored one are
    moved to `checkpoints.damaged/` (left in place when not `move_damaged`: a reader such
    as `moetrain eval` changes nothing in a run that may be training) with a
    DamagedCheckpointWarning naming step and cause.
    Returns (step, state, meta); raises CheckpointError when no step reads back.
    """
    damaged = []
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # noqa: BLE001 -- any failure to read means damage.
        damaged.append((step, e))
        continue
      if check is not None:
        check(meta, step)
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # noqa: BLE001
        damaged.append((step, e))
        continue
      for bad, cause in damaged:
        done = f'moved it to {self.quarantine(bad)} and resuming' if move_damaged else \
            'left it in place and reading'
        if warn:
          warnings.warn(DamagedCheckpointWarning(
              f'checkpoint at step {bad} is damaged ({_cause(cause)}); {done} from step '
              f'{step}.'), stacklevel=2)
      return step, state, meta
    causes = '; '.join(f'step {s}: {_cause(e)}' for s, e in damaged)
    raise CheckpointError(
        f'no checkpoint in {self.directory} can be read ({causes}); move the folder aside '
        'to start afresh, or repair it, since resuming from scratch would discard them.')

  def quarantine(self, step: int):
    """Moves the folder of a damaged `step` to `checkpoints.damaged/` (never deletes it)."""
    return self.move_aside(step, self.damaged_directory)

  def move_aside(self, step: int, folder):
    """Moves the folder of `step` into `folder` (as `<step>`, or `<step>.<n>` when taken);
    process 0 moves it while the others wait. Returns where it went."""
    folder = paths.path(folder)
    dest, n = folder / str(step), 1
    while paths.exists(dest):
      dest, n = folder / f'{step}.{n}', n + 1
    self.manager.wait_until_finished()
    self.manager.close()
    if jax.process_index() == 0:
      paths.make_dirs(folder)
      paths.rename(self.directory / str(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'moetrain_move_aside_{step}')
    self.manager = self._open()
    return dest

  def restore_step(self, step: int, target, check=None):
    """Restores exactly `step` (`checkpoint.restore_step`), after `check(meta, step)`;
    damage raises CheckpointError (no fallback: the user asked for this step). Returns
    (state, meta)."""
    if step not in self.steps():
      raise CheckpointError(
          f'checkpoint.restore_step={step} is not a checkpoint in {self.directory} (there '
          f'are {", ".join(map(str, self.steps())) or "none"}); pick one of them, or 0 for '
          'the newest.')
    try:
      meta = self.read_meta(step)
      if check is not None:
        check(meta, step)
      return self.restore(step, target)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 -- any failure to read means damage.
      raise CheckpointError(
          f'checkpoint.restore_step={step} cannot be read ({_cause(e)}); pick another step '
          'or 0 for the newest that reads back.') from None

  def prune(self):
    """Deletes all but the newest `keep` steps and the last good one named in the newest
    one's metadata, but only once the newest one reads back in full (checksums
    included); otherwise deletes nothing."""
    steps = self.steps()
    if len(steps) <= self.keep:
      return
    try:
      self.read_arrays(steps[-1])
      last_good = self.read_meta(steps[-1]).get('guard', {}).get('last_good')
    except Exception as e:  # noqa: BLE001
      warnings.warn(DamagedCheckpointWarning(
          f'checkpoint at step {steps[-1]} does not read back ({_cause(e)}); keeping all '
          f'older checkpoints.'), stacklevel=2)
      return
    for step in steps[:-self.keep]:
      if step != last_good:
        self.manager.delete(step)

  def check_for_errors(self):
    """Raises the error of an async save that failed (a full disk, say), if any."""
    self.manager.check_for_errors()

  def wait(self):
    """Blocks until the async save in flight (if any) is committed."""
    self.manager.wait_until_finished()

  def close(self):
    """Waits for the save in flight, applies retention and releases the manager."""
    self.manager.wait_until_finished()
    self.prune()
    self.manager.close()


def _cause(error: Exception) -> str:
  """A one-line description of why a checkpoint did not read back."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = text[:200]
  return f'{type(error).__name__}: {text}' if text else type(error).__name__
