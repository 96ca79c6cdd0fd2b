"""A trained run, restored for inference (eval, sampling, analysis): its config from
`config.json` with optional overrides, and its newest readable checkpoint laid out on a mesh
of this process's devices (any mesh: the checkpoint reshards on restore)."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
from flax import nnx

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import optimizer as optimizer_lib
from moetrain import paths
from moetrain import state as state_lib
from moetrain.interop import params as params_lib
from moetrain.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Run:
  """A restored run: `state` is the whole TrainState at checkpoint `step`, laid out on
  `mesh`; `cfg` is the run's config with the overrides applied."""
  workdir: object  # an epath.Path (local or gs://)
  cfg: object
  step: int
  graphdef: object
  state: state_lib.TrainState
  mesh: jax.sharding.Mesh
  tokenizer: object

  def model(self, overrides: dict | None = None) -> nnx.Module:
    """The model with the checkpoint's weights (router biases included), built from the
    run's config with `overrides` of keys that leave the arrays' shapes alone (e.g.
    {'model.moe.eval_capacity_factor': 1.0}). Each call returns a model of its own:
    changing its weights in place (`w[...] = ...`) leaves the run and other models alone."""
    graphdef = self.graphdef
    if overrides:
      shape_keys = sorted(set(overrides) & set(checkpoint_lib.SHAPE_KEYS))
      if shape_keys:
        raise config_lib.ConfigError(
            f'{", ".join(shape_keys)} change the shapes of the saved arrays; a restored '
            'model takes only overrides that keep them, so drop these keys.')
      cfg = self.cfg.copy_and_resolve_references()
      for key, value in overrides.items():
        config_lib.check_key(key)
        config_lib.set_key(cfg, key, value)
      graphdef = state_lib.abstract_state(config_lib.validate(cfg), self.mesh,
                                          optimizer_lib.make_optimizer(cfg.train))[0]
    return nnx.merge(graphdef, self.state.params, self.state.model_state, copy=True)


def run_config(workdir, overrides: dict | None = None):
  """The config a run was trained with (`workdir/config.json`), with `overrides`
  ({'data.source': 'files', ...}) applied, validated and with its vocabulary resolved."""
  cfg = params_lib.run_config(workdir)
  for key, value in (overrides or {}).items():
    config_lib.check_key(key)
    config_lib.set_key(cfg, key, value)
  return data_lib.resolve_vocab(config_lib.validate(cfg))


def load(workdir, overrides: dict | None = None, *, devices=None) -> Run:
  """Restores the newest readable checkpoint of `workdir` onto a mesh of `devices` (this
  process's devices by default) shaped by the config's `mesh.*` keys after `overrides`.

  Reads through `Checkpointer.restore_latest` (checksums verified; a damaged newest step
  falls back to an older one with a warning). A reader changes nothing in the workdir: it
  takes no lock, prunes nothing and moves no damaged step aside, so a run can be read
  while it trains.

  Raises ConfigError (one sentence) for a workdir without config or checkpoints, a mesh
  that does not fit the devices, or overrides that change the saved arrays' shapes."""
  workdir = paths.path(workdir)
  cfg = run_config(workdir, overrides)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh_lib.check(cfg, len(devices))
  # keep=sys.maxsize: reading a run never prunes its checkpoints, whatever the overrides.
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=sys.maxsize)
  try:
    if not checkpointer.steps():
      raise config_lib.ConfigError(f'{workdir} has no checkpoints yet; train it first.')
    mesh = mesh_lib.make_mesh(cfg, devices=devices)
    graphdef, abstract, shardings = state_lib.abstract_state(
        cfg, mesh, optimizer_lib.make_optimizer(cfg.train))
    config = json.loads(cfg.to_json_best_effort())
    shapes = checkpoint_lib.shapes_of(abstract)
    check = lambda meta, step: checkpoint_lib.check_compatible(meta, config, shapes, step)
    step, state, _ = checkpointer.restore_latest(
        state_lib.restore_target(abstract, shardings), check=check, move_damaged=False)
  finally:
    checkpointer.close()
  return Run(workdir, cfg, step, graphdef, state, mesh, data_lib.make_tokenizer(cfg.data))
