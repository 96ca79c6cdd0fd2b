"""Checkpoints with orbax: the train state as a flat dict of arrays, plus JSON metadata
(config, data iterator position)."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


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


class Checkpointer:
  """An orbax CheckpointManager in `workdir/checkpoints`."""

  def __init__(self, workdir, keep: int = 3):
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False):
    """Starts an async save of `state` (a pytree of arrays) and `meta` (JSON-able)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, target):
    """Restores the state at `step` into the structure (and shardings) of `target`, whose
    leaves may be arrays or jax.ShapeDtypeStruct. Returns (state, meta)."""
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, 'sharding', None))
                for k, v in flatten(target).items()}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return unflatten_like(target, out['state']), out['meta']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
