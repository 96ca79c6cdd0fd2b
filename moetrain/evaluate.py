"""Eval only: a trained run's loss (nats/token), perplexity and bits per byte on its eval
split, or on other data given by config overrides.

  moetrain eval --workdir=runs/tiny [--eval_batches=N] \
      [--config.data.source=files --config.data.paths=corpus/*.txt ...]

The core is `evaluate(run, batches, model=...)`: a restored run (`moetrain.restore.load`,
with config overrides), any batches (default: the eval split of the run's data config)
and optionally another model (say, with an expert ablated) -> `EvalTotals` sums, from
which loss, perplexity and bits per byte follow. Evaluation runs at eval capacity
(`model.moe.eval_capacity_factor`) on the mesh of the run's config (`mesh.*` keys,
overridable), so with the run's own settings the loss equals the training run's final
eval loss.
"""

from __future__ import annotations

import functools

import jax

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import restore as restore_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain.parallel import mesh as mesh_lib


def eval_batches(cfg) -> list[dict]:
  """The fixed eval batches of a data config (this process's slices): the first
  train.eval_batches batches of the eval split of data.source."""
  data = data_lib.make_data(cfg)
  data.train.close()
  return data.eval_batches


@functools.lru_cache(maxsize=8)
def eval_step(graphdef, eod_id: int, loss_chunk: int = 0):
  """The jitted eval step of a model structure: models that differ only in their arrays
  (an expert ablated, other weights) share one compile."""
  return jax.jit(step_lib.make_eval_step(graphdef, eod_id, loss_chunk))


def evaluate(run: restore_lib.Run, batches: list[dict] | None = None, *,
             model=None) -> metrics_lib.EvalTotals:
  """Loss and byte sums of `model` (default: the run's restored model) over `batches`
  (default: `eval_batches(run.cfg)`), on the run's mesh."""
  model = run.model() if model is None else model
  batches = eval_batches(run.cfg) if batches is None else batches
  graphdef, params, model_state = state_lib.split_model(model)
  eval_fn = eval_step(graphdef, run.tokenizer.eod_id, run.cfg.model.loss_chunk)
  sharding = mesh_lib.batch_sharding(run.mesh)
  put = lambda batch: data_lib.to_global(batch, sharding)
  with jax.set_mesh(run.mesh):
    bytes_2V = step_lib.bytes_table(run.tokenizer, run.cfg.model.vocab_size, run.mesh)
    return step_lib.evaluate(eval_fn, params, model_state, batches, put, bytes_2V)


def evaluate_workdir(workdir, overrides: dict | None = None,
                     num_batches: int | None = None):
  """Restores `workdir` with `overrides` and evaluates it on its (overridden) data
  config's eval split, `num_batches` batches (default: train.eval_batches).
  Returns (run, EvalTotals)."""
  run = restore_lib.load(workdir, with_eval_batches(overrides, num_batches))
  return run, evaluate(run)


def with_eval_batches(overrides: dict | None, num_batches: int | None) -> dict:
  """`overrides` plus train.eval_batches=num_batches when that is given (checked)."""
  overrides = dict(overrides or {})
  if num_batches is not None:
    if num_batches <= 0:
      raise config_lib.ConfigError(f'--eval_batches={num_batches} must be positive; pass '
                                   'the number of eval batches to read.')
    overrides['train.eval_batches'] = num_batches
  return overrides


def report_lines(run: restore_lib.Run, totals: metrics_lib.EvalTotals) -> list[str]:
  """What `moetrain eval` prints."""
  d = run.cfg.data
  source = d.source if d.source != 'files' else f'files {d.paths}'
  return [
      f'{run.workdir} at step {run.step}, eval split of data.source={source} '
      f'(tokenizer {d.tokenizer}): {totals.tokens:,.0f} tokens, {totals.bytes:,.0f} bytes',
      f'loss           {totals.loss:.4f} nats/token ({totals.bits_per_token:.3f} bits/token)',
      f'perplexity     {totals.perplexity:.3f}',
      f'bits per byte  {totals.bits_per_byte:.4f}',
  ]
