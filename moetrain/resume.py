"""Where a run starts: checkpoint.restore_step, else the newest checkpoint that reads back,
else another run's parameters (`init.from_workdir`: a warm start, or sparse upcycling with
`init.upcycle`), else a fresh init. Restored states are resharded onto the run's mesh."""

from __future__ import annotations

import json

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import state as state_lib
from moetrain.interop import params as params_lib
from moetrain.interop import upcycle


def init_from_run(cfg, mesh, tx, log=print):
  """A step-0 train state whose parameters come from the newest checkpoint of
  `init.from_workdir`: copied (warm start) or, with `init.upcycle`, upcycled into this
  config's MoE. Returns (graphdef, state, state_shardings)."""
  source = cfg.init.from_workdir
  step, source_params = params_lib.newest_params(source)
  graphdef, fresh, _ = state_lib.init_state(cfg, mesh, tx)
  fresh_params = params_lib.to_flat(fresh.params)
  if cfg.init.upcycle:
    flat = upcycle.upcycle_params(source_params, fresh_params, source=source)
    how = 'upcycled (each expert copies the dense feed-forward, routers fresh)'
  else:
    flat = upcycle.warm_start_params(source_params, fresh_params, source=source)
    how = 'copied'
  log(f'parameters {how} from {source} at step {step}')
  return state_lib.state_with_params(cfg, mesh, tx, params_lib.from_flat(fresh.params, flat))


ABANDONED = 'checkpoints.abandoned'  # where checkpoint.restore_step moves newer steps.


def restore_or_init(cfg, checkpointer, data, mesh, tx, log=print):
  """The train state to start from: `checkpoint.restore_step` or else the newest
  checkpoint that reads back (resharded onto `mesh`, with `data.train` moved to its
  position) or, when there is none, a fresh one.

  Checks the checkpoint's shapes against `cfg` before anything compiles. Returns
  (graphdef, state, state_shardings, meta of the restored checkpoint or None).
  """
  steps, want = checkpointer.steps(), cfg.checkpoint.restore_step
  if not steps:
    if want:
      raise config_lib.ConfigError(
          f'checkpoint.restore_step={want} but {checkpointer.directory} holds no '
          'checkpoints; set it to 0 to start a new run.')
    if cfg.init.from_workdir:
      return *init_from_run(cfg, mesh, tx, log=log), None
    graphdef, state, shardings = state_lib.init_state(cfg, mesh, tx)
    return graphdef, state, shardings, None
  graphdef, abstract, shardings = state_lib.abstract_state(cfg, mesh, tx)
  target = state_lib.restore_target(abstract, shardings)
  config = json.loads(cfg.to_json_best_effort())
  shapes = checkpoint_lib.shapes_of(abstract)
  check = lambda meta, step: checkpoint_lib.check_compatible(meta, config, shapes, step)
  if want and want != steps[-1] and not _descends_from(checkpointer, steps[-1], want):
    state, meta = checkpointer.restore_step(want, target, check=check)
    newer = [s for s in steps if s > want]
    for s in newer:
      checkpointer.move_aside(s, checkpointer.workdir / ABANDONED)
    log(f'restoring checkpoint.restore_step={want}; the newer checkpoints '
        f'({", ".join(map(str, newer))}) moved to {checkpointer.workdir / ABANDONED}')
    step, meta = want, dict(meta, restored_from=want)
  else:
    step, state, meta = checkpointer.restore_latest(target, check=check)
  if step > cfg.train.steps:
    raise config_lib.ConfigError(
        f'the checkpoint in {checkpointer.directory} is at step {step}, beyond '
        f'train.steps={cfg.train.steps}; raise train.steps or choose a new --workdir.')
  if meta.get('data') is not None:  # None: an imported model, data not yet read.
    data.train.restore(meta['data'])
  log(f'resuming from the checkpoint at step {step}')
  return graphdef, state, shardings, meta


def _descends_from(checkpointer, newest: int, step: int) -> bool:
  """Whether the newest checkpoint was saved by a run that restored `step` (so a command
  that still says checkpoint.restore_step=step resumes from the newest)."""
  try:
    return checkpointer.read_meta(newest).get('restored_from') == step
  except Exception:  # noqa: BLE001 -- unreadable: not a descendant.
    return False
