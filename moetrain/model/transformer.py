"""Decoder-only language model: embedding -> N x (attention, dense or MoE FFN) -> logits.

`Transformer.__call__` runs whole sequences (training, eval); `Transformer.decode` runs new
tokens against a key-value cache (`KVCache`) for sampling: prefill a prompt once, then one
position per generated token.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from moetrain import config as config_lib
from moetrain.model.attention import Attention
from moetrain.model.layers import MLP, RMSNorm, param
from moetrain.model.moe import MoE


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, model_cfg, is_moe: bool, *, rngs: nnx.Rngs, dtype, param_dtype,
               layer: int | None = None):
    m = model_cfg
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(m.d_model, m.num_heads, m.num_kv_heads, rope_theta=m.rope_theta,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                          qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, norm_eps=m.norm_eps,
                          head_dim=m.head_dim)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    if is_moe:
      self.ffn = MoE(m, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer=layer)
    else:
      self.ffn = MLP(m.d_model, m.d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.is_moe = is_moe

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, *, train: bool, rng):
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)
    return self.ffn_residual(x_BLD, train=train, rng=rng)

  def ffn_residual(self, x_BLD, *, train: bool, rng):
    """x + ffn(norm(x)) and the MoE layer's statistics (None for a dense FFN)."""
    h_BLD = self.ffn_norm(x_BLD)
    if self.is_moe:
      y_BLD, stats = self.ffn(h_BLD, train=train, rng=rng)
    else:
      y_BLD, stats = self.ffn(h_BLD), None
    return x_BLD + y_BLD.astype(x_BLD.dtype), stats

  def decode(self, x_BLD, positions_BL, k_BSGK, v_BSGK):
    """The block on L new tokens per row against this layer's key-value cache (eval mode);
    returns (x [B, L, D], k_BSGK, v_BSGK) with the new keys and values written."""
    y_BLD, k_BSGK, v_BSGK = self.attn.decode(self.attn_norm(x_BLD), positions_BL, k_BSGK,
                                             v_BSGK)
    x_BLD, _ = self.ffn_residual(x_BLD + y_BLD, train=False, rng=None)
    return x_BLD, k_BSGK, v_BSGK


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, [B, layers, S, G, K] each: row b's token at position p
  sits in slot p (S slots: positions 0..S-1)."""
  k: jax.Array
  v: jax.Array


class Transformer(nnx.Module):
  """tokens [B, L] int32 -> logits [B, L, V] float32, plus one statistics dict per MoE layer."""

  def __init__(self, model_cfg, *, rngs: nnx.Rngs):
    m = model_cfg
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    self.embed = param(rngs, (m.vocab_size, m.d_model), ('vocab', 'embed'), std=m.init_std,
                       dtype=param_dtype)
    moe = set(config_lib.moe_layers(m))
    self.blocks = nnx.List([Block(m, i in moe, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype, layer=i)
                            for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.unembed = None if m.tie_embeddings else param(
        rngs, (m.d_model, m.vocab_size), ('embed', 'vocab'), fan_in=m.d_model,
        dtype=param_dtype)
    self.dtype = dtype
    self.remat = m.remat

  def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None,
               train: bool = False, rng=None):
    batch, length = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if rng is None:
      rng = jax.random.key(0)
    x_BLD = self.embed_tokens(tokens_BL)
    stats = []
    for i, block in enumerate(self.blocks):
      call = nnx.remat(type(block).__call__, static_argnames=('train',)) if self.remat \
          else type(block).__call__
      x_BLD, block_stats = call(block, x_BLD, positions_BL, segment_ids_BL, train=train,
                                rng=jax.random.fold_in(rng, i))
      if block_stats is not None:
        stats.append(block_stats)
    return self.logits(x_BLD), stats

  def embed_tokens(self, tokens_BL):
    """tokens [B, L] int32 -> embeddings [B, L, D] in the compute dtype."""
    return self.embed[...].astype(self.dtype)[tokens_BL]

  def logits(self, x_BLD):
    """Final norm and unembedding: [B, L, D] -> float32 logits [B, L, V]."""
    batch, length, _ = x_BLD.shape
    x_TD = self.final_norm(x_BLD).reshape(batch * length, -1)  # one GEMM (bench/NOTES.md)
    if self.unembed is None:
      logits = jnp.einsum('td,vd->tv', x_TD, self.embed[...].astype(self.dtype))
    else:
      logits = x_TD @ self.unembed[...].astype(self.dtype)
    return logits.reshape(batch, length, -1).astype(jnp.float32)

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for `batch` rows, in the compute dtype."""
    attn = self.blocks[0].attn
    shape = (batch, len(self.blocks), length, attn.num_kv_heads, attn.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def decode(self, tokens_BL, positions_BL, cache: KVCache):
    """L new tokens per row at `positions_BL` against `cache` (eval mode, no statistics):
    float32 logits [B, L, V] and the cache with their keys and values written. A position
    >= the cache length writes nothing (its logits are then meaningless)."""
    x_BLD = self.embed_tokens(tokens_BL)
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x_BLD, k_BSGK, v_BSGK = block.decode(x_BLD, positions_BL, cache.k[:, i], cache.v[:, i])
      ks.append(k_BSGK)
      vs.append(v_BSGK)
    return self.logits(x_BLD), KVCache(jnp.stack(ks, axis=1), jnp.stack(vs, axis=1))
