"""The training loop: one jitted step that optimizes router and experts jointly, periodic
eval on the held-out split, logging, and orbax checkpoints that never lose work.

A run on a workdir with checkpoints resumes from the newest one that reads back (the
train state, RNG, step, data position and divergence-guard history are all saved, so the
resumed run is exact) or from `checkpoint.restore_step`; SIGTERM/SIGINT finish the current
step, save and return; the divergence guard (moetrain/guard.py) stops training at a
non-finite or spiking step before it can reach a checkpoint, naming the last good one (or
skips non-finite updates with `train.skip_nonfinite=True`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import jax
import numpy as np
from tqdm import tqdm

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import guard as guard_lib
from moetrain import metrics as metrics_lib
from moetrain import paths
from moetrain import step as step_lib
from moetrain import workdir as workdir_lib
from moetrain import optimizer as optimizer_lib
from moetrain import resume
from moetrain.model import attention
from moetrain.parallel import mesh as mesh_lib
from moetrain.preemption import PreemptionHandler


@dataclasses.dataclass
class Summary:
  """What a finished run reports."""
  steps: int
  final_loss: float
  eval_loss: float
  eval_unigram_entropy: float
  tokens_per_second: float
  seconds: float
  preempted: bool = False  # stopped early by SIGTERM/SIGINT, after saving.
  first_step: int = 0  # the step this call started from (a resumed run's checkpoint).
  eval_bits_per_byte: float = float('nan')  # the final eval loss per byte of text.

  def lines(self) -> list[str]:
    stopped = [f'stopped by a signal at step {self.steps} after saving a checkpoint; run the '
               'same command again to resume'] if self.preempted else []
    evaluated = not np.isnan(self.eval_loss)  # NaN: stopped before the first eval.
    return stopped + [
        f'final eval loss {self.eval_loss:.4f} nats/token '
        f'({self.eval_loss / np.log(2):.3f} bits), {self.eval_bits_per_byte:.4f} bits/byte'
        if evaluated else 'no eval loss yet: this call stopped before its first eval',
        f'unigram entropy of the eval split {self.eval_unigram_entropy:.4f} nats/token '
        f'({self.eval_unigram_entropy / np.log(2):.3f} bits)',
        f'{self.steps - self.first_step} steps in {self.seconds:.1f} s, '
        f'{self.tokens_per_second:,.0f} tokens/s' if self.steps > self.first_step else
        f'no step trained in this call: the run had finished at step {self.steps}',
    ]


def prepare(cfg, log=None):
  """Validates and resolves a copy of a config (a warmup longer than the run is clamped,
  said through `log`); raises ConfigError before anything compiles."""
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  note = config_lib.clamp_warmup(cfg)
  if note and log:
    log(note)
  mesh_lib.check(cfg, jax.device_count())
  attention.choose_impl(cfg.model.attention_impl, seq_len=cfg.data.seq_len,
                        dtype=cfg.model.dtype)
  return cfg


def checkpoint_meta(cfg, data, guard, restored_from: int | None) -> dict:
  """The JSON saved beside the train state: the config, the data iterator position, the
  divergence guard's history and the checkpoint.restore_step this run descends from."""
  return dict(config=json.loads(cfg.to_json_best_effort()), data=data.train.state(),
              guard=guard.state(), restored_from=restored_from)


def close_all(closers, quiet: bool):
  """Calls each closer; the first error is raised after all ran, unless `quiet` (an
  error is already on its way, and a second one would hide it)."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001
      first = first or e
  if first is not None and not quiet:
    raise first


def train(cfg, workdir, *, log=print, stop: PreemptionHandler | None = None) -> Summary:
  """Trains `cfg` to train.steps under `workdir`: resumes from its checkpoints if any,
  saves every checkpoint.every_steps (async) and at the end, and on SIGTERM/SIGINT
  (caught by `stop`, an entered PreemptionHandler, when given: a sweep's, which outlives
  this run).

  Holds the workdir's lock meanwhile. A write the filesystem refuses (disk full,
  read-only, no permission) raises WorkdirError with one sentence; the checkpoints saved
  before it stay readable (orbax commits a save by renaming a finished folder).
  """
  workdir = paths.path(workdir)  # a gs:// one without the gcp extra stops here.
  cfg = prepare(cfg, log)
  try:
    with workdir_lib.locked(workdir, log), workdir_lib.quiet_write_errors():
      return _train(cfg, workdir, log, stop)
  except Exception as e:
    if isinstance(e, workdir_lib.WorkdirError) or not workdir_lib.refused_write_in(e, workdir):
      raise
    raise workdir_lib.WorkdirError(workdir_lib.os_error_sentence(e, workdir)) from None


def _train(cfg, workdir, log, stop) -> Summary:
  """`train` in a locked workdir, with a prepared config."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep)
  data = data_lib.make_data(cfg, log=log)
  mesh = mesh_lib.make_mesh(cfg)
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, state, shardings, meta = resume.restore_or_init(cfg, checkpointer, data, mesh,
                                                            tx, log=log)
  guard = guard_lib.Guard.from_config(cfg.train, meta and meta.get('guard'))
  restored_from = meta and meta.get('restored_from')
  batch_sharding = mesh_lib.batch_sharding(mesh)
  put = lambda batch: data_lib.to_global(batch, batch_sharding)
  step_fn = step_lib.jit_train_step(graphdef, tx, cfg, shardings)
  eval_fn = jax.jit(
      step_lib.make_eval_step(graphdef, data.tokenizer.eod_id, cfg.model.loss_chunk))
  bytes_2V = step_lib.bytes_table(data.tokenizer, cfg.model.vocab_size, mesh)
  run_eval = lambda state: step_lib.evaluate(eval_fn, state.params, state.model_state,
                                             data.eval_batches, put, bytes_2V)
  writer = metrics_lib.MetricWriter(workdir)
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir / 'config.json', cfg.to_json_best_effort(indent=2))

  t, every = cfg.train, cfg.checkpoint.every_steps
  first = int(jax.device_get(state.step))
  if meta is not None:
    guard.note_checkpoint(first)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  log(f'training {workdir}: steps {first + 1}..{t.steps} of {tokens_per_step} tokens on mesh '
      f'{dict(mesh.shape)}; {data.description}')
  bar = tqdm(initial=first, total=t.steps,
             disable=not t.progress or jax.process_index() != 0, dynamic_ncols=True)
  note = log if bar.disable else bar.write  # messages between progress-bar updates.
  start = last_time = time.perf_counter()
  last_step, step = first, first
  loss, records = float('nan'), []
  totals = metrics_lib.EvalTotals(float('nan'), float('nan'), float('nan'))  # no eval yet
  failed = True
  try:
    with jax.set_mesh(mesh), (contextlib.nullcontext(stop) if stop else
                              PreemptionHandler()) as stop:
      while step < t.steps:
        state, metrics = step_fn(state, put(next(data.train)))
        step += 1
        bar.update(1)
        records.append((step, metrics['nonfinite'], metrics['loss'], metrics['grad_norm']))
        if step % t.log_every == 0 or step == t.steps:
          guard.check(jax.device_get(records), log=note)
          records = []
          checkpointer.check_for_errors()  # a failed async save stops training here.
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          metrics['tokens_per_second'] = (step - last_step) * tokens_per_step / (now - last_time)
          metrics.update(data_lib.state_metrics(data.train.state()))
          last_step, last_time = step, now
          loss = float(metrics['loss'])
          writer.write(step, metrics)
          bar.set_postfix(loss=f'{loss:.3f}', tok_s=f"{metrics['tokens_per_second']:,.0f}")
        if step % t.eval_every == 0 or step == t.steps:
          totals = run_eval(state)
          writer.write(step, totals.scalars())
          note(f'step {step}: eval loss {totals.loss:.4f}')
        preempted = stop.stop_requested()
        if preempted:
          note(stop.describe(step))
        if (every and step % every == 0) or step == t.steps or preempted:
          guard.check(jax.device_get(records), log=note)
          records = []
          writer.flush()  # in a bucket: the logs up to this checkpoint are uploaded.
          checkpointer.save(step, state, checkpoint_meta(cfg, data, guard, restored_from),
                            force=True)
          guard.note_checkpoint(step)
        if preempted:
          break
      else:
        preempted = False
      bar.close()
      seconds = time.perf_counter() - start
    failed = False
  finally:
    close_all((checkpointer.close, writer.close, data.train.close), quiet=failed)
  if step == first and first == t.steps:
    log(f'the checkpoint is already at train.steps={t.steps}; nothing to train.')
    # Report the finished run: the checkpoint's eval loss, the last logged training loss.
    with jax.set_mesh(mesh):
      totals = run_eval(state)
    logged = workdir / metrics_lib.JSONL
    losses = [r['loss'] for r in metrics_lib.read_jsonl(logged) if 'loss' in r] \
        if metrics_lib.jsonl_files(logged) else []
    loss = losses[-1] if losses else loss
  summary = Summary(step, loss, totals.loss, data.eval_unigram_entropy,
                    (step - first) * tokens_per_step / max(seconds, 1e-9), seconds, preempted,
                    first, totals.bits_per_byte)
  for line in summary.lines():
    log(line)
  return summary
