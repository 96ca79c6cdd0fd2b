"""Gradient accumulation (`train.grad_accum_steps`): the batch split into micro-batches
that run one after another in a `lax.scan`, their gradients summed into the whole batch's.

How the parts combine across n micro-batches: the cross-entropy adds up exactly (each
micro-batch's token losses divide by the whole batch's token count); the balance and
z-losses and the routing metrics are means of the per-micro-batch values (max_logit: the
max). Capacity, and the balance statistics of balance_scope='micro_batch' or 'global',
are per micro-batch, so with drops or those scopes the update differs from the whole
batch's; balance_scope='sequence' gives the same update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moetrain.parallel import mesh as mesh_lib


def micro_batches(batch, n: int):
  """[B, ...] arrays -> [n, B/n, ...]: micro-batch i takes rows i, i+n, i+2n, ..., so each
  device's rows (a contiguous block of the batch sharding) split evenly between the
  micro-batches and none has to move."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return mesh_lib.constrain_batch(x, batch_dim=1)

  return jax.tree.map(split, batch)


def combine_micro_stats(stats):
  """Per-layer statistics stacked over micro-batches [n, ...] -> one dict per layer: the
  mean over micro-batches (max for max_logit). Every micro-batch has the same number of
  tokens, so the mean load is the whole batch's load share."""
  return [{k: (jnp.max(v, 0) if k == 'max_logit' else jnp.mean(v, 0)) for k, v in s.items()}
          for s in stats]


def accumulated_grad_fn(loss_fn, n: int):
  """(params, model_state, batch, rng) -> ((loss, (parts, stats)), grads) over `n`
  micro-batches, from `loss_fn(params, model_state, batch, rng, num_tokens, aux_weight)`
  -> (loss, (parts, stats)) (step.make_loss_fn): each micro-batch divides by the whole
  batch's token count and weighs the router losses by 1/n, so losses and gradients sum
  to the whole batch's."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, model_state, batch, rng):
    num_tokens = jnp.maximum(jnp.sum(batch['mask']), 1.0)

    def body(grads, xs):
      micro, i = xs
      (loss, (parts, stats)), g = grad_fn(params, model_state, micro,
                                          jax.random.fold_in(rng, i), num_tokens, 1.0 / n)
      return jax.tree.map(jnp.add, grads, g), (loss, parts, stats)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, parts, stats) = jax.lax.scan(
        body, zeros, (micro_batches(batch, n), jnp.arange(n)))
    parts = dict(ce=jnp.sum(parts['ce']), balance_loss=jnp.mean(parts['balance_loss']),
                 z_loss=jnp.mean(parts['z_loss']))
    return (jnp.sum(losses), (parts, combine_micro_stats(stats))), grads

  return accumulated
