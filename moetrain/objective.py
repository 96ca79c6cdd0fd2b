"""The training objective: next-token cross-entropy plus the router auxiliary losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array):
  """Mean next-token cross-entropy (nats) over positions where mask is 1."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jnp.sum((logz_BL - target_logit_BL) * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)


def aux_losses(stats: list[dict]) -> tuple[jax.Array, jax.Array]:
  """Balance and z-losses summed over MoE layers (zeros for a dense model)."""
  balance = sum((s['balance_loss'] for s in stats), jnp.zeros((), jnp.float32))
  z = sum((s['z_loss'] for s in stats), jnp.zeros((), jnp.float32))
  return balance, z


def total_loss(logits_BLV, stats, batch, moe_cfg):
  """ce + balance_coef * sum balance + z_coef * sum z; returns (loss, parts dict)."""
  ce = cross_entropy(logits_BLV, batch['targets'], batch['mask'])
  balance, z = aux_losses(stats)
  loss = ce + moe_cfg.balance_coef * balance + moe_cfg.z_coef * z
  return loss, dict(ce=ce, balance_loss=balance, z_loss=z)
