"""The step functions training jits: the train step (forward pass, loss, gradients over
micro-batches, optimizer update, router-bias update, the non-finite guard) and the eval
step (loss, token and byte sums at eval capacity), and eval over a list of batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain import accumulate
from moetrain import config as config_lib
from moetrain import metrics as metrics_lib
from moetrain import objective
from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import token_bytes
from moetrain.model import routing


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
  schedule = optimizer_lib.make_schedule(cfg.train)
  moe_layers = config_lib.moe_layers(cfg.model)
  grad_fn = make_grad_fn(graphdef, cfg)

  def train_step(state: state_lib.TrainState, batch):
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
      model_state = state_lib.split_model(model)[2]
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
