"""Causal self-attention with grouped-query heads and rotary embeddings, over a whole
sequence (`Attention.__call__`) or for new tokens against a key-value cache
(`Attention.decode`, for sampling); optional q/k/v biases (Qwen2) and per-head RMSNorm of
queries and keys before the rotation (Qwen3).

The layer is three separable steps: `Attention.project` (q/k/v projections and rotary
embeddings), the attention itself (`attend` over a whole sequence, by one of several
implementations; `masked_attention` against a cache), and `Attention.output` (the output
projection).

Implementations of `attend` (`model.attention_impl`), all with the same inputs and output:
- xla: the scores as batched einsums, heads-major (any backend; materializes [L, L]).
- dot_product: `jax.nn.dot_product_attention` with XLA's lowering.
- cudnn: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash
  attention (GPU, bfloat16 or float16).
- splash: the Pallas splash-attention kernel (TPU; sequence a multiple of 128), run per
  device under `jax.shard_map` over the batch axes, one multi-query kernel per key-value
  head (grouped-query attention).
- auto: splash on TPU when the sequence allows it, cudnn on GPU in bfloat16, else xla.

Shapes: B batch, L sequence, H query heads, G key-value heads, R = H / G queries per
key-value head, K head size, D model width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moetrain import backend
from moetrain.config import ConfigError
from moetrain.model.layers import RMSNorm, param, rope, scoped, use
from moetrain.parallel import mesh as mesh_lib

SPLASH_BLOCK = 128  # the splash kernel's default block: the sequence must be a multiple.


def attention_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
  """bool [B or 1, L, L]: causal, and within one document when segment ids are given."""
  causal_LL = jnp.tril(jnp.ones((length, length), bool))
  if segment_ids_BL is None:
    return causal_LL[None]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return causal_LL & same_BLL


def cache_mask(positions_BL: jax.Array, cache_len: int) -> jax.Array:
  """bool [B, L, S]: a query at position p sees the cache slots 0..p (slot = position)."""
  return jnp.arange(cache_len)[None, None, :] <= positions_BL[:, :, None]


def masked_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array,
                     mask_BLS: jax.Array) -> jax.Array:
  """Softmax attention of L queries over S keys, H query heads sharing G key-value heads:
  out [B, L, H, K] in q's dtype; mask [B or 1, L, S] (True: attend), scores in float32."""
  batch, length, num_heads, head_dim = q_BLHK.shape
  keys, num_kv_heads = k_BSGK.shape[1], k_BSGK.shape[2]
  group = num_heads // num_kv_heads
  # Heads-major layout: the R = H / G queries sharing a key-value head are stacked along
  # the query axis, so scores and outputs are plain batched GEMMs over [B, G]
  # ([R*L, K] x [K, S]); the 5-d einsum form ran 2x slower on XLA:CPU (bench/NOTES.md).
  q_BGQK = q_BLHK.reshape(batch, length, num_kv_heads, group, head_dim) \
      .transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * length, head_dim)
  k_BGSK = k_BSGK.transpose(0, 2, 1, 3)
  v_BGSK = v_BSGK.transpose(0, 2, 1, 3)
  scores = jnp.einsum('bgqk,bgmk->bgqm', q_BGQK, k_BGSK).astype(jnp.float32)
  scores = scores * head_dim ** -0.5
  rows = mask_BLS.shape[0]
  mask = jnp.broadcast_to(mask_BLS[:, None, None], (rows, 1, group, length, keys)).reshape(
      rows, 1, group * length, keys)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BLHK.dtype)
  out_BGQK = jnp.einsum('bgqm,bgmk->bgqk', probs, v_BGSK)
  return out_BGQK.reshape(batch, num_kv_heads, group, length, head_dim) \
      .transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def write_cache(cache_BSGK: jax.Array, new_BLGK: jax.Array, positions_BL: jax.Array):
  """The cache with each new key (or value) written at the slot of its position."""
  rows_BL = jnp.broadcast_to(jnp.arange(cache_BSGK.shape[0])[:, None], positions_BL.shape)
  return cache_BSGK.at[rows_BL, positions_BL].set(new_BLGK.astype(cache_BSGK.dtype),
                                                  mode='drop')


def choose_impl(impl: str, *, seq_len: int, dtype: str, platform: str | None = None) -> str:
  """The implementation `impl` runs as on `platform` (default: the target backend).

  Resolves 'auto'; raises ConfigError (one sentence) for a kernel the platform lacks.
  """
  platform = platform or backend.name()
  splash_ok = platform == 'tpu' and seq_len % SPLASH_BLOCK == 0
  if impl == 'auto':
    if splash_ok:
      return 'splash'
    return 'cudnn' if platform == 'gpu' and dtype == 'bfloat16' else 'xla'
  if impl == 'cudnn' and (platform != 'gpu' or dtype != 'bfloat16'):
    raise ConfigError(f"model.attention_impl='cudnn' needs a GPU and model.dtype="
                      f"'bfloat16' (here: {platform}, {dtype}); use 'auto' or 'xla'.")
  if impl == 'splash' and not splash_ok:
    raise ConfigError(f"model.attention_impl='splash' needs a TPU and data.seq_len a "
                      f'multiple of {SPLASH_BLOCK} (here: {platform}, {seq_len}); use '
                      "'auto' or 'xla'.")
  return impl


def xla_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None):
  """softmax(q k^T / sqrt(K) + causal/document mask) v, scores in float32: [B, L, H, K]
  (`masked_attention` over the sequence's own keys)."""
  mask_BLL = attention_mask(segment_ids_BL, q_BLHK.shape[1])
  return masked_attention(q_BLHK, k_BLGK, v_BLGK, mask_BLL)


def dot_product_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, *,
                          implementation=None):
  """`jax.nn.dot_product_attention` (causal; document mask from segment ids): [B, L, H, K]."""
  mask = None
  if segment_ids_BL is not None:
    mask = attention_mask(segment_ids_BL, q_BLHK.shape[1])[:, None]  # [B, 1, L, L]
  return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask,
                                      is_causal=mask is None,
                                      implementation=implementation)


def _splash_kernel(rep: int, length: int, interpret: bool):
  """A causal multi-query splash kernel for `rep` query heads over one key-value head
  (built per trace: it holds arrays, which must belong to the trace that uses them)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel, splash_attention_mask as mask_lib)
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * rep)
  return kernel.make_splash_mqa_single_device(mask=mask, interpret=interpret)


def splash_local(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, *, interpret: bool = False):
  """The splash kernel on this device's sequences, one multi-query call per (sequence,
  key-value head); `interpret` runs the Pallas kernel in interpret mode (CPU tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  batch, length, heads, head_dim = q_BLHK.shape
  groups = k_BLGK.shape[2]
  rep = heads // groups
  kernel = _splash_kernel(rep, length, interpret)
  q_BGRLK = (q_BLHK * head_dim ** -0.5).reshape(batch, length, groups, rep, head_dim) \
      .transpose(0, 2, 3, 1, 4)
  k_BGLK, v_BGLK = k_BLGK.transpose(0, 2, 1, 3), v_BLGK.transpose(0, 2, 1, 3)
  if segment_ids_BL is None:
    segment_ids_BL = jnp.zeros((batch, length), jnp.int32)

  def one(q_RLK, k_LK, v_LK, seg_L):
    return kernel(q_RLK, k_LK, v_LK,
                  segment_ids=splash_attention_kernel.SegmentIds(seg_L, seg_L))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  out_BGRLK = jax.vmap(per_head)(q_BGRLK, k_BGLK, v_BGLK, segment_ids_BL)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def splash_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, *, interpret=False):
  """`splash_local` per device: a Pallas kernel is not partitioned by GSPMD, so it runs
  under shard_map over the batch axes of the current mesh (directly without one)."""
  mesh = mesh_lib.current_mesh()
  local = functools.partial(splash_local, interpret=interpret)
  if mesh is None:
    return local(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
  tokens = P(mesh_lib.BATCH_AXES)
  seg_spec = None if segment_ids_BL is None else tokens
  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, seg_spec),
                       out_specs=tokens, check_vma=False)(
                           q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


@scoped('attention')
def attend(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, *, impl: str = 'xla'):
  """Causal (and, with segment ids, per-document) attention by a resolved `impl`
  (see `choose_impl`): [B, L, H, K] in the dtype of q."""
  if impl == 'xla':
    return xla_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
  if impl == 'splash':
    return splash_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
  return dot_product_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL,
                               implementation='cudnn' if impl == 'cudnn' else None)


class Attention(nnx.Module):
  """Multi-head causal attention; H query heads share G = num_kv_heads key/value heads of
  K = head_dim features (0: d_model // H).

  `qkv_bias` adds biases b_q [H, K], b_k, b_v [G, K] to the projections; `qk_norm` applies
  an RMSNorm over each head's K features (scales q_norm, k_norm [K], eps `norm_eps`) to
  queries and keys before the rotary embedding. `project` (all of that) and `output` are
  separate from the attention itself, so the full-sequence call and the KV-cache `decode`
  share them.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rope_theta: float,
               rngs: nnx.Rngs, dtype, param_dtype, qkv_bias: bool = False,
               qk_norm: bool = False, norm_eps: float = 1e-6, head_dim: int = 0,
               impl: str = 'xla'):
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
    self.impl = impl  # model.attention_impl, resolved per call by `choose_impl`.

  @scoped('attn_proj')
  def project(self, x_BLD, positions_BL):
    """Queries [B, L, H, K] and keys [B, L, G, K] with rotary embeddings, values [B, L, G, K]."""
    x_BLD = x_BLD.astype(self.dtype)
    batch, length, d_model = x_BLD.shape
    # Projections as GEMMs over flattened tokens [B*L, D]: XLA:CPU runs the weight
    # gradient of a [B, L, D] einsum 2-3x slower (bench/NOTES.md).
    x_TD = x_BLD.reshape(batch * length, d_model)

    def project(w_DHK, b_HK, norm):
      w = use(w_DHK, self.dtype)
      y_BLHK = (x_TD @ w.reshape(d_model, -1)).reshape(batch, length, *w.shape[1:])
      y_BLHK = y_BLHK if b_HK is None else y_BLHK + use(b_HK, self.dtype)
      return y_BLHK if norm is None else norm(y_BLHK)

    q_BLHK = rope(project(self.w_q, self.b_q, self.q_norm), positions_BL, self.rope_theta)
    k_BLGK = rope(project(self.w_k, self.b_k, self.k_norm), positions_BL, self.rope_theta)
    return q_BLHK, k_BLGK, project(self.w_v, self.b_v, None)

  @scoped('attn_proj')
  def output(self, out_BLHK):
    """The output projection [B, L, H, K] -> [B, L, D]."""
    batch, length = out_BLHK.shape[:2]
    w_o = use(self.w_o, self.dtype).reshape(self.num_heads * self.head_dim, -1)
    out_TM = out_BLHK.reshape(batch * length, self.num_heads * self.head_dim)
    return (out_TM @ w_o).reshape(batch, length, -1)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None):
    q_BLHK, k_BLGK, v_BLGK = self.project(x_BLD, positions_BL)
    impl = choose_impl(self.impl, seq_len=x_BLD.shape[1], dtype=jnp.dtype(self.dtype).name)
    return self.output(attend(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, impl=impl))

  def decode(self, x_BLD, positions_BL, k_BSGK, v_BSGK):
    """L new tokens per row against a key-value cache of S slots (slot = position).

    Writes the new keys and values at their positions, attends each query to the slots
    up to its position, and returns (y [B, L, D], k_BSGK, v_BSGK)."""
    q_BLHK, k_BLGK, v_BLGK = self.project(x_BLD, positions_BL)
    k_BSGK = write_cache(k_BSGK, k_BLGK, positions_BL)
    v_BSGK = write_cache(v_BSGK, v_BLGK, positions_BL)
    mask_BLS = cache_mask(positions_BL, k_BSGK.shape[1])
    with jax.named_scope('attention'):
      out_BLHK = masked_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS)
    return self.output(out_BLHK), k_BSGK, v_BSGK
