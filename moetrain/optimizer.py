"""The optimizer of the train step (`train.*` keys): AdamW with weight decay on matrices,
global-norm gradient clipping, and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
