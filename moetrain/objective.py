"""The training objective: next-token cross-entropy plus the router auxiliary losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-position cross-entropy (nats) [B, L]: logsumexp(logits) - logits[target]."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return logz_BL - target_logit_BL


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array):
  """Sum of next-token cross-entropy (nats) over positions where mask is 1."""
  return jnp.sum(token_losses(logits_BLV, targets_BL) * mask_BL)


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array):
  """Mean next-token cross-entropy (nats) over positions where mask is 1."""
  return cross_entropy_sum(logits_BLV, targets_BL, mask_BL) / jnp.maximum(jnp.sum(mask_BL),
                                                                          1.0)


def chunked_cross_entropy_sum(x_BLD: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array,
                              logits_fn, chunk: int):
  """`cross_entropy_sum(logits_fn(x_BLD), ...)` without the whole [B, L, V] logits.

  A `lax.scan` over chunks of `chunk` sequence positions (the batch axis, and so its
  sharding, stays whole): each step computes that chunk's float32 logits [B, chunk, V]
  with `logits_fn` and reduces them to one number; `jax.checkpoint` makes the backward
  pass recompute them instead of keeping every chunk's logits alive.
  """
  batch, length, d = x_BLD.shape
  n = length // chunk
  split = lambda a: a.reshape(batch, n, chunk, *a.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(x_BCD, targets_BC, mask_BC):
    return cross_entropy_sum(logits_fn(x_BCD), targets_BC, mask_BC)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (split(x_BLD), split(targets_BL), split(mask_BL)))
  return total


def aux_losses(stats: list[dict]) -> tuple[jax.Array, jax.Array]:
  """Balance and z-losses summed over MoE layers (zeros for a dense model)."""
  balance = sum((s['balance_loss'] for s in stats), jnp.zeros((), jnp.float32))
  z = sum((s['z_loss'] for s in stats), jnp.zeros((), jnp.float32))
  return balance, z


def combine(ce, stats, moe_cfg, aux_weight: float = 1.0):
  """ce + aux_weight * (balance_coef * sum balance + z_coef * sum z) over the MoE layers'
  `stats`; returns (loss, dict(ce, balance_loss, z_loss))."""
  balance, z = aux_losses(stats)
  loss = ce + aux_weight * (moe_cfg.balance_coef * balance + moe_cfg.z_coef * z)
  return loss, dict(ce=ce, balance_loss=balance, z_loss=z)
