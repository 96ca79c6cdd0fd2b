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
import signal
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from moetrain import accumulate
from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import guard as guard_lib
from moetrain import metrics as metrics_lib
from moetrain import objective
from moetrain import paths
from moetrain import token_bytes
from moetrain import workdir as workdir_lib
from moetrain.interop import params as params_lib
from moetrain.interop import upcycle
from moetrain.model import attention, routing
from moetrain.model.transformer import Transformer
from moetrain.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `model_state` holds non-trained variables (the
  router biases of aux-loss-free balancing); `rng` is raw uint32 key data."""
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  model_state: nnx.State
  rng: jax.Array


def make_schedule(train_cfg):
  """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
  t = train_cfg
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` (same EmptyState, same values up to rounding) as one
  scalar multiply: optax's `select(norm < max, g, g / norm * max)` makes XLA:CPU write a
  scaled copy of every gradient and read both in the Adam update (bench/NOTES.md)."""
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg):
  """AdamW with global-norm clipping; weight decay on matrices only."""
  t = train_cfg
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=decay_mask))


def split_model(model):
  """graphdef, trained params, other variables."""
  return nnx.split(model, nnx.Param, ...)


def _create_fn(cfg, tx):
  """() -> a fresh TrainState (to be traced by eval_shape or jit)."""
  def create():
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    _, params, model_state = split_model(model)
    rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state, rng)

  return create


def abstract_state(cfg, mesh, tx):
  """Shapes, dtypes and shardings of the train state, without computing or compiling.

  Returns (graphdef, abstract TrainState of ShapeDtypeStructs, state_shardings).
  """
  abstract = jax.eval_shape(_create_fn(cfg, tx))
  graphdef = split_model(nnx.eval_shape(lambda: Transformer(cfg.model,
                                                             rngs=nnx.Rngs(0))))[0]
  return graphdef, abstract, state_shardings(abstract, mesh)


def init_state(cfg, mesh, tx):
  """Creates the model and optimizer state directly in their shardings on `mesh`.

  Returns (graphdef, state, state_shardings).
  """
  graphdef, _, shardings = abstract_state(cfg, mesh, tx)
  with jax.set_mesh(mesh):
    state = jax.jit(_create_fn(cfg, tx), out_shardings=shardings)()
  return graphdef, state, shardings


def state_with_params(cfg, mesh, tx, params):
  """A train state at step 0 whose parameters are `params` (an nnx.State of arrays with the
  structure of the model's), with a fresh optimizer state, model state and RNG.

  Returns (graphdef, state, state_shardings), like `init_state`.
  """
  graphdef, _, shardings = abstract_state(cfg, mesh, tx)
  create = _create_fn(cfg, tx)

  def replace(params):
    return create().replace(params=params, opt_state=tx.init(params))

  with jax.set_mesh(mesh):
    state = jax.jit(replace, out_shardings=shardings)(params)
  return graphdef, state, shardings


def state_shardings(abstract_state: TrainState, mesh):
  """Shardings of a TrainState: every Variable with logical `axes` (the params and the
  optimizer moments, which keep their metadata) follows them; the rest is replicated."""
  return mesh_lib.state_shardings(abstract_state, mesh)


def update_router_biases(model, stats, rate: float):
  """Aux-loss-free balancing: nudges each MoE layer's selection bias toward equal load.
  `stats` holds one dict per MoE layer, in layer order; adds `bias_norm` to each."""
  modules = model.moe_modules()
  index = {layer: i for i, layer in enumerate(l for _, layers in modules for l in layers)}
  for moe, layers in modules:
    if moe.bias is None:
      continue
    layer_stats = [stats[index[layer]] for layer in layers]
    load = jnp.stack([s['load_E'] for s in layer_stats])  # [layers, E]
    bias = moe.bias[...]
    bias = routing.bias_update(bias.reshape(load.shape), load, rate).reshape(bias.shape)
    moe.bias[...] = bias
    for s, b in zip(layer_stats, bias.reshape(load.shape)):
      s['bias_norm'] = jnp.linalg.norm(b)


def forward(model, batch, loss_chunk: int, *, train: bool, rng=None):
  """The model on a batch: (sum of the token cross-entropies over the loss mask, the
  per-MoE-layer statistics). With `loss_chunk` (model.loss_chunk) the logits are made and
  reduced chunk by chunk (objective.chunked_cross_entropy_sum)."""
  kwargs = dict(positions_BL=batch.get('positions'), segment_ids_BL=batch.get('segment_ids'),
                train=train, rng=rng)
  x_BLD, stats = model.hidden(batch['inputs'], **kwargs)
  with jax.named_scope('loss'):  # the output projection and the cross-entropy
    if loss_chunk:
      ce_sum = objective.chunked_cross_entropy_sum(
          x_BLD, batch['targets'], batch['mask'], model.logits_fn(), loss_chunk)
    else:
      ce_sum = objective.cross_entropy_sum(model.logits_fn()(x_BLD), batch['targets'],
                                           batch['mask'])
  return ce_sum, stats


def make_loss_fn(graphdef, cfg):
  """(params, model_state, batch, rng[, num_tokens, aux_weight]) -> (loss, (loss parts,
  per-MoE-layer stats)).

  loss = (sum of token cross-entropies) / num_tokens + aux_weight * router losses;
  num_tokens defaults to the batch's own mask count (the mean cross-entropy). Gradient
  accumulation passes the whole batch's count and 1/micro-batches, so the micro-batch
  losses add up to the whole batch's.
  """
  def loss_fn(params, model_state, batch, rng, num_tokens=None, aux_weight=1.0):
    model = nnx.merge(graphdef, params, model_state)
    ce_sum, stats = forward(model, batch, cfg.model.loss_chunk, train=True, rng=rng)
    if num_tokens is None:
      num_tokens = jnp.maximum(jnp.sum(batch['mask']), 1.0)
    loss, parts = objective.combine(ce_sum / num_tokens, stats, cfg.model.moe, aux_weight)
    return loss, (parts, stats)

  return loss_fn


def make_grad_fn(graphdef, cfg):
  """(params, model_state, batch, rng) -> ((loss, (parts, stats)), grads) for the whole
  batch; with train.grad_accum_steps > 1 over micro-batches in a `lax.scan`
  (`moetrain.accumulate`: the same update as the whole batch, see make_loss_fn)."""
  loss_fn = make_loss_fn(graphdef, cfg)
  if cfg.train.grad_accum_steps == 1:
    return jax.value_and_grad(loss_fn, has_aux=True)
  return accumulate.accumulated_grad_fn(loss_fn, cfg.train.grad_accum_steps)


def make_train_step(graphdef, tx, cfg):
  """(state, batch) -> (state, metrics). Metrics are device arrays."""
  moe_cfg = cfg.model.moe
  schedule = make_schedule(cfg.train)
  moe_layers = config_lib.moe_layers(cfg.model)
  grad_fn = make_grad_fn(graphdef, cfg)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (parts, stats)), grads = grad_fn(state.params, state.model_state, batch, rng)
    with jax.named_scope('optimizer'):
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if moe_cfg.bias_update_rate > 0:
      model = nnx.merge(graphdef, params, model_state)
      update_router_biases(model, stats, moe_cfg.bias_update_rate)
      model_state = split_model(model)[2]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    if cfg.train.skip_nonfinite:
      params, opt_state, model_state = keep_if(
          finite, (params, opt_state, model_state),
          (state.params, state.opt_state, state.model_state))
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   nonfinite=1.0 - finite.astype(jnp.float32),
                   **parts, **metrics_lib.routing_metrics(stats, moe_layers))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  return train_step


def jit_train_step(graphdef, tx, cfg, shardings):
  """The jitted train step as training runs it (and `moetrain compile` compiles it): the
  state donated, the new state in `shardings`."""
  return jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=0,
                 out_shardings=(shardings, None))


def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or Inf (one sum per leaf: NaN and Inf
  propagate into it)."""
  return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(leaf)) for leaf in jax.tree.leaves(tree)]))


def keep_if(condition, new, old):
  """Leafwise `new if condition else old` for two pytrees of the same structure."""
  return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def make_eval_step(graphdef, eod_id: int, loss_chunk: int = 0):
  """(params, model_state, batch, bytes_2V) -> sums over the batch at eval capacity:
  `nats` (token losses), `tokens` and `bytes`, the UTF-8 bytes the target tokens decode to
  (bytes_2V: `moetrain.token_bytes.TokenBytes.table()`), and `dropped` [MoE layers], each
  MoE layer's fraction of assignments dropped for capacity; `loss_chunk` as
  model.loss_chunk."""
  def eval_step(params, model_state, batch, bytes_2V):
    model = nnx.merge(graphdef, params, model_state)
    nats, stats = forward(model, batch, loss_chunk, train=False)
    count = jnp.sum(batch['mask'])
    bytes_BL = token_bytes.target_bytes(batch['inputs'], batch['targets'], bytes_2V, eod_id)
    return dict(nats=nats, tokens=count, bytes=jnp.sum(bytes_BL * batch['mask']),
                dropped=jnp.asarray([s['dropped_frac'] for s in stats], jnp.float32))

  return eval_step


def bytes_table(tokenizer, vocab_size: int, mesh) -> jax.Array:
  """The tokenizer's byte table [2, V] replicated over `mesh`, for `make_eval_step`."""
  table = token_bytes.token_bytes(tokenizer, vocab_size).table()
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), table)


def evaluate(eval_fn, params, model_state, batches, put, bytes_2V) -> metrics_lib.EvalTotals:
  """Loss and byte sums over the fixed eval batches (fetched once, at the end), and the
  mean dropped fraction of each MoE layer."""
  sums = jax.device_get([eval_fn(params, model_state, put(batch), bytes_2V)
                         for batch in batches])
  dropped = tuple(np.mean([s['dropped'] for s in sums], axis=0).tolist()) if sums else ()
  return metrics_lib.EvalTotals(*(float(sum(s[k] for s in sums))
                                  for k in ('nats', 'tokens', 'bytes')), dropped)


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


class PreemptionHandler:
  """Context manager that turns SIGTERM and SIGINT into a stop request.

  The loop polls `stop_requested()` after each step, then saves and returns. A second
  signal raises KeyboardInterrupt. The previous handlers come back on exit. Outside the
  main thread (where Python cannot install handlers) it never requests a stop.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    # Only records the signal: printing here could re-enter a print in progress.
    if self.signum is not None:
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}')
    self.signum = signum

  def stop_requested(self) -> bool:
    """True once any process got a signal (all processes agree, so all save together)."""
    requested = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
    return requested

  def describe(self, step: int) -> str:
    """The log line for a stop at `step`."""
    return (f'{self._name()} received: saving a checkpoint at step {step} and exiting (send '
            'it again to stop at once).')

  def describe_sweep(self, run: str) -> str:
    """The log line for a sweep stopped at run `run`."""
    return (f'sweep stopped by {self._name()} at run {run}; run the same command again to '
            'resume it.')

  def _name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else 'a stop request'


def checkpoint_meta(cfg, data, guard, restored_from: int | None) -> dict:
  """The JSON saved beside the train state: the config, the data iterator position, the
  divergence guard's history and the checkpoint.restore_step this run descends from."""
  return dict(config=json.loads(cfg.to_json_best_effort()), data=data.train.state(),
              guard=guard.state(), restored_from=restored_from)


def restore_target(abstract, shardings):
  """The abstract train state with each leaf's sharding: what a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def init_from_run(cfg, mesh, tx, log=print):
  """A step-0 train state whose parameters come from the newest checkpoint of
  `init.from_workdir`: copied (warm start) or, with `init.upcycle`, upcycled into this
  config's MoE. Returns (graphdef, state, state_shardings)."""
  source = cfg.init.from_workdir
  step, source_params = params_lib.newest_params(source)
  graphdef, fresh, _ = init_state(cfg, mesh, tx)
  fresh_params = params_lib.to_flat(fresh.params)
  if cfg.init.upcycle:
    flat = upcycle.upcycle_params(source_params, fresh_params, source=source)
    how = 'upcycled (each expert copies the dense feed-forward, routers fresh)'
  else:
    flat = upcycle.warm_start_params(source_params, fresh_params, source=source)
    how = 'copied'
  log(f'parameters {how} from {source} at step {step}')
  return state_with_params(cfg, mesh, tx, params_lib.from_flat(fresh.params, flat))


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
    graphdef, state, shardings = init_state(cfg, mesh, tx)
    return graphdef, state, shardings, None
  graphdef, abstract, shardings = abstract_state(cfg, mesh, tx)
  target = restore_target(abstract, shardings)
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
  tx = make_optimizer(cfg.train)
  graphdef, state, shardings, meta = restore_or_init(cfg, checkpointer, data, mesh, tx,
                                                     log=log)
  guard = guard_lib.Guard.from_config(cfg.train, meta and meta.get('guard'))
  restored_from = meta and meta.get('restored_from')
  batch_sharding = mesh_lib.batch_sharding(mesh)
  put = lambda batch: data_lib.to_global(batch, batch_sharding)
  step_fn = jit_train_step(graphdef, tx, cfg, shardings)
  eval_fn = jax.jit(
      make_eval_step(graphdef, data.tokenizer.eod_id, cfg.model.loss_chunk))
  bytes_2V = bytes_table(data.tokenizer, cfg.model.vocab_size, mesh)
  run_eval = lambda state: evaluate(eval_fn, state.params, state.model_state,
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
