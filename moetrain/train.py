"""The training loop: one jitted step that optimizes router and experts jointly, periodic
eval on the held-out split, logging, and an orbax checkpoint at the end."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import objective
from moetrain.model import routing
from moetrain.model.moe import MoE
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


def make_optimizer(train_cfg):
  """AdamW with global-norm clipping; weight decay on matrices only."""
  t = train_cfg
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=decay_mask))


def split_model(model):
  """graphdef, trained params, other variables."""
  return nnx.split(model, nnx.Param, ...)


def init_state(cfg, mesh, tx):
  """Creates the model and optimizer state directly in their shardings on `mesh`.

  Returns (graphdef, state, state_shardings).
  """
  def create():
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    _, params, model_state = split_model(model)
    rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state, rng)

  abstract = jax.eval_shape(create)
  graphdef = split_model(nnx.eval_shape(lambda: Transformer(cfg.model,
                                                             rngs=nnx.Rngs(0))))[0]
  shardings = state_shardings(abstract, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(create, out_shardings=shardings)()
  return graphdef, state, shardings


def state_shardings(abstract_state: TrainState, mesh):
  """Shardings of a TrainState: every Variable with logical `axes` (the params and the
  optimizer moments, which keep their metadata) follows them; the rest is replicated."""
  return mesh_lib.state_shardings(abstract_state, mesh)


def update_router_biases(model, stats, rate: float):
  """Aux-loss-free balancing: nudges each MoE layer's selection bias toward equal load.
  Adds `bias_norm` to the layer's stats."""
  moe_layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]
  for moe, s in zip(moe_layers, stats):
    if moe.bias is not None:
      moe.bias[...] = routing.bias_update(moe.bias[...], s['load_E'], rate)
      s['bias_norm'] = jnp.linalg.norm(moe.bias[...])


def make_loss_fn(graphdef, cfg):
  """(params, model_state, batch, rng) -> (loss, (loss parts, per-MoE-layer stats))."""
  def loss_fn(params, model_state, batch, rng):
    model = nnx.merge(graphdef, params, model_state)
    logits, stats = model(batch['inputs'], positions_BL=batch.get('positions'),
                          segment_ids_BL=batch.get('segment_ids'), train=True, rng=rng)
    loss, parts = objective.total_loss(logits, stats, batch, cfg.model.moe)
    return loss, (parts, stats)

  return loss_fn


def make_train_step(graphdef, tx, cfg):
  """(state, batch) -> (state, metrics). Metrics are device arrays."""
  moe_cfg = cfg.model.moe
  schedule = make_schedule(cfg.train)
  moe_layers = config_lib.moe_layers(cfg.model)
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (parts, stats)), grads = grad_fn(state.params, state.model_state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if moe_cfg.bias_update_rate > 0:
      model = nnx.merge(graphdef, params, model_state)
      update_router_biases(model, stats, moe_cfg.bias_update_rate)
      model_state = split_model(model)[2]
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step),
                   **parts, **metrics_lib.routing_metrics(stats, moe_layers))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef):
  """(state, batch) -> (sum of token losses, number of tokens), at eval capacity."""
  def eval_step(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params, state.model_state)
    logits, _ = model(batch['inputs'], positions_BL=batch.get('positions'),
                      segment_ids_BL=batch.get('segment_ids'), train=False)
    ce = objective.cross_entropy(logits, batch['targets'], batch['mask'])
    count = jnp.sum(batch['mask'])
    return ce * count, count

  return eval_step


def evaluate(eval_fn, state, batches, put) -> float:
  """Mean cross-entropy (nats/token) over the fixed eval batches."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = eval_fn(state, put(batch))
    total, count = total + float(s), count + float(c)
  return total / count


@dataclasses.dataclass
class Summary:
  """What a finished run reports."""
  steps: int
  final_loss: float
  eval_loss: float
  eval_unigram_entropy: float
  tokens_per_second: float
  seconds: float

  def lines(self) -> list[str]:
    return [
        f'final eval loss {self.eval_loss:.4f} nats/token '
        f'({self.eval_loss / np.log(2):.3f} bits)',
        f'unigram entropy of the eval split {self.eval_unigram_entropy:.4f} nats/token '
        f'({self.eval_unigram_entropy / np.log(2):.3f} bits)',
        f'{self.steps} steps in {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s',
    ]


def prepare(cfg):
  """Validates and resolves a config; raises ConfigError before anything compiles."""
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  mesh_lib.check(cfg, jax.device_count())
  return cfg


def train(cfg, workdir, *, log=print) -> Summary:
  """Trains `cfg` to train.steps, writing logs and a final checkpoint under `workdir`."""
  cfg = prepare(cfg)
  workdir = pathlib.Path(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep)
  if checkpointer.steps():
    raise config_lib.ConfigError(
        f'{workdir} already holds checkpoints at steps {checkpointer.steps()}; choose a new '
        '--workdir (this run would not overwrite them).')
  data = data_lib.make_data(cfg)
  mesh = mesh_lib.make_mesh(cfg)
  tx = make_optimizer(cfg.train)
  graphdef, state, shardings = init_state(cfg, mesh, tx)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  put = lambda batch: data_lib.to_global(batch, batch_sharding)
  step_fn = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=0,
                    out_shardings=(shardings, None))
  eval_fn = jax.jit(make_eval_step(graphdef))
  writer = metrics_lib.MetricWriter(workdir)
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(cfg.to_json_best_effort(indent=2))

  t = cfg.train
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  log(f'training {workdir}: {t.steps} steps of {tokens_per_step} tokens on mesh '
      f'{dict(mesh.shape)}; {data.num_train_tokens:,} training tokens')
  bar = tqdm(total=t.steps, disable=not t.progress or jax.process_index() != 0,
             dynamic_ncols=True)
  start = last_time = time.perf_counter()
  last_step, loss, eval_loss = 0, float('nan'), float('nan')
  with jax.set_mesh(mesh):
    for step in range(1, t.steps + 1):
      state, metrics = step_fn(state, put(next(data.train)))
      bar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        metrics['tokens_per_second'] = (step - last_step) * tokens_per_step / (now - last_time)
        last_step, last_time = step, now
        loss = float(metrics['loss'])
        writer.write(step, metrics)
        bar.set_postfix(loss=f'{loss:.3f}', tok_s=f"{metrics['tokens_per_second']:,.0f}")
      if step % t.eval_every == 0 or step == t.steps:
        eval_loss = evaluate(eval_fn, state, data.eval_batches, put)
        writer.write(step, {'eval/loss': eval_loss})
        bar.write(f'step {step}: eval loss {eval_loss:.4f}')
    bar.close()
    seconds = time.perf_counter() - start
    checkpointer.save(t.steps, state, dict(config=json.loads(cfg.to_json_best_effort()),
                                           data=data.train.state()), force=True)
    checkpointer.close()
  writer.close()
  summary = Summary(t.steps, loss, eval_loss, data.eval_unigram_entropy,
                    t.steps * tokens_per_step / seconds, seconds)
  for line in summary.lines():
    log(line)
  return summary
