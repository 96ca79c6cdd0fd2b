"""Causal self-attention with grouped-query heads and rotary embeddings; optional q/k/v
biases (Qwen2) and per-head RMSNorm of queries and keys before the rotation (Qwen3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.model.layers import RMSNorm, param, rope


def attention_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
  """bool [B or 1, 1, 1, L, L]: causal, and within one document when segment ids are given."""
  causal_LL = jnp.tril(jnp.ones((length, length), bool))
  if segment_ids_BL is None:
    return causal_LL[None, None, None]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LL & same_BLL)[:, None, None]


class Attention(nnx.Module):
  """Multi-head causal attention; H query heads share G = num_kv_heads key/value heads of
  K = head_dim features (0: d_model // H).

  `qkv_bias` adds biases b_q [H, K], b_k, b_v [G, K] to the projections; `qk_norm` applies
  an RMSNorm over each head's K features (scales q_norm, k_norm [K], eps `norm_eps`) to
  queries and keys before the rotary embedding.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rope_theta: float,
               rngs: nnx.Rngs, dtype, param_dtype, qkv_bias: bool = False,
               qk_norm: bool = False, norm_eps: float = 1e-6, head_dim: int = 0):
    head_dim = head_dim or d_model // num_heads
    self.w_q = param(rngs, (d_model, num_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_k = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_v = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'heads', 'head_dim'),
                     fan_in=d_model, dtype=param_dtype)
    self.w_o = param(rngs, (num_heads, head_dim, d_model), ('heads', 'head_dim', 'embed'),
                     fan_in=d_model, dtype=param_dtype)
    bias = lambda heads: param(rngs, (heads, head_dim), ('heads', 'head_dim'), init='zeros',
                               dtype=param_dtype) if qkv_bias else None
    self.b_q, self.b_k, self.b_v = bias(num_heads), bias(num_kv_heads), bias(num_kv_heads)
    norm = lambda: RMSNorm(head_dim, eps=norm_eps, rngs=rngs, param_dtype=param_dtype,
                           axis_name='head_dim') if qk_norm else None
    self.q_norm, self.k_norm = norm(), norm()
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.dtype = dtype

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None):
    cast = lambda w: w[...].astype(self.dtype)
    x_BLD = x_BLD.astype(self.dtype)
    batch, length, d_model = x_BLD.shape
    # Projections as GEMMs over flattened tokens [B*L, D]: XLA:CPU runs the weight
    # gradient of a [B, L, D] einsum 2-3x slower (bench/NOTES.md).
    x_TD = x_BLD.reshape(batch * length, d_model)

    def project(w_DHK, b_HK, norm):
      w = cast(w_DHK)
      y_BLHK = (x_TD @ w.reshape(d_model, -1)).reshape(batch, length, *w.shape[1:])
      y_BLHK = y_BLHK if b_HK is None else y_BLHK + cast(b_HK)
      return y_BLHK if norm is None else norm(y_BLHK)

    q_BLHK = rope(project(self.w_q, self.b_q, self.q_norm), positions_BL, self.rope_theta)
    k_BLGK = rope(project(self.w_k, self.b_k, self.k_norm), positions_BL, self.rope_theta)
    v_BLGK = project(self.w_v, self.b_v, None)
    group = self.num_heads // self.num_kv_heads
    # Heads-major layout: the R = H / G queries sharing a key-value head are stacked along
    # the query axis, so scores and outputs are plain batched GEMMs over [B, G]
    # ([R*L, K] x [K, L]); the 5-d einsum form ran 2x slower on XLA:CPU (bench/NOTES.md).
    q_BGQK = q_BLHK.reshape(batch, length, self.num_kv_heads, group, self.head_dim) \
        .transpose(0, 2, 3, 1, 4).reshape(batch, self.num_kv_heads, group * length,
                                           self.head_dim)
    k_BGLK = k_BLGK.transpose(0, 2, 1, 3)
    v_BGLK = v_BLGK.transpose(0, 2, 1, 3)
    scores = jnp.einsum('bgqk,bgmk->bgqm', q_BGQK, k_BGLK).astype(jnp.float32)
    scores = scores * self.head_dim ** -0.5
    mask = attention_mask(segment_ids_BL, length)  # [B or 1, 1, 1, L, L]
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, group, length, length)).reshape(
        mask.shape[0], 1, group * length, length)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out_BGQK = jnp.einsum('bgqm,bgmk->bgqk', probs, v_BGLK)
    out_BLGRK = out_BGQK.reshape(batch, self.num_kv_heads, group, length, self.head_dim) \
        .transpose(0, 3, 1, 2, 4)
    out_TM = out_BLGRK.reshape(batch * length, self.num_heads * self.head_dim)
    w_o = cast(self.w_o).reshape(self.num_heads * self.head_dim, d_model)
    return (out_TM @ w_o).reshape(batch, length, d_model)
