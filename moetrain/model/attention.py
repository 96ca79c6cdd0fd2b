"""Causal self-attention with grouped-query heads and rotary embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.model.layers import param, rope


def attention_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
  """bool [B or 1, 1, 1, L, L]: causal, and within one document when segment ids are given."""
  causal_LL = jnp.tril(jnp.ones((length, length), bool))
  if segment_ids_BL is None:
    return causal_LL[None, None, None]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LL & same_BLL)[:, None, None]


class Attention(nnx.Module):
  """Multi-head causal attention; H query heads share G = num_kv_heads key/value heads."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rope_theta: float,
               rngs: nnx.Rngs, dtype, param_dtype):
    head_dim = d_model // num_heads
    self.w_q = param(rngs, (d_model, num_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_k = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_v = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_o = param(rngs, (num_heads, head_dim, d_model), ('heads', 'head_dim', 'embed'),
                     fan_in=d_model, dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.dtype = dtype

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None):
    cast = lambda w: w[...].astype(self.dtype)
    x_BLD = x_BLD.astype(self.dtype)
    batch, length, _ = x_BLD.shape
    q_BLHK = rope(jnp.einsum('bld,dhk->blhk', x_BLD, cast(self.w_q)), positions_BL,
                  self.rope_theta)
    k_BLGK = rope(jnp.einsum('bld,dgk->blgk', x_BLD, cast(self.w_k)), positions_BL,
                  self.rope_theta)
    v_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, cast(self.w_v))
    group = self.num_heads // self.num_kv_heads
    q_BLGRK = q_BLHK.reshape(batch, length, self.num_kv_heads, group, self.head_dim)
    scores = jnp.einsum('blgrk,bmgk->bgrlm', q_BLGRK, k_BLGK).astype(jnp.float32)
    scores = scores * self.head_dim ** -0.5
    mask = attention_mask(segment_ids_BL, length)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out_BLGRK = jnp.einsum('bgrlm,bmgk->blgrk', probs, v_BLGK)
    out_BLHK = out_BLGRK.reshape(batch, length, self.num_heads, self.head_dim)
    return jnp.einsum('blhk,hkd->bld', out_BLHK, cast(self.w_o))
