"""Attention against a NumPy loop over heads: grouped-query heads, rotary embeddings, and the
Qwen options (q/k/v biases, per-head q/k RMSNorm, a head size other than d_model / H); the
KV-cache pieces (masked attention over cache slots, cache writes) against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain.model.attention import Attention, cache_mask, masked_attention, write_cache

B, L, D, H, G = 2, 10, 24, 4, 2


def np_rope(x_LK, positions_L, theta):
  half = x_LK.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  angle = positions_L[:, None] * freq
  x1, x2 = x_LK[:, :half], x_LK[:, half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_attention(x_BLD, p, head_dim, eps, theta=10_000.0):
  """Causal attention one batch row and one query head at a time."""
  out = np.zeros_like(x_BLD)
  positions = np.arange(L, dtype=np.float64)
  for b in range(B):
    for h in range(H):
      g = h // (H // G)  # query heads h share key-value head g in consecutive groups.
      q = x_BLD[b] @ p['w_q'][:, h] + p.get('b_q', np.zeros((H, head_dim)))[h]
      k = x_BLD[b] @ p['w_k'][:, g] + p.get('b_k', np.zeros((G, head_dim)))[g]
      v = x_BLD[b] @ p['w_v'][:, g] + p.get('b_v', np.zeros((G, head_dim)))[g]
      if 'q_norm' in p:
        q, k = np_rms_norm(q, p['q_norm'], eps), np_rms_norm(k, p['k_norm'], eps)
      q, k = np_rope(q, positions, theta), np_rope(k, positions, theta)
      scores = q @ k.T / np.sqrt(head_dim)
      scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[b] += (probs @ v) @ p['w_o'][h]
  return out


@pytest.mark.parametrize('qkv_bias,qk_norm,head_dim', [(False, False, 0), (True, True, 10)])
def test_attention_matches_numpy_loop(qkv_bias, qk_norm, head_dim, rng):
  eps = 1e-5
  layer = Attention(D, H, G, rope_theta=10_000.0, rngs=nnx.Rngs(0), dtype=jnp.float32,
                    param_dtype=jnp.float32, qkv_bias=qkv_bias, qk_norm=qk_norm,
                    norm_eps=eps, head_dim=head_dim)
  k = head_dim or D // H
  assert layer.w_q.shape == (D, H, k) and layer.w_o.shape == (H, k, D)
  assert (layer.q_norm is not None) == qk_norm and (layer.b_q is not None) == qkv_bias
  params = {}
  for name in ('w_q', 'w_k', 'w_v', 'w_o') + (('b_q', 'b_k', 'b_v') if qkv_bias else ()):
    variable = getattr(layer, name)
    params[name] = rng.standard_normal(variable.shape) * (0.3 if name[0] == 'b' else D ** -0.5)
    variable[...] = jnp.asarray(params[name], jnp.float32)
  if qk_norm:
    for name in ('q_norm', 'k_norm'):
      params[name] = 1 + 0.3 * rng.standard_normal(k)
      getattr(layer, name).scale[...] = jnp.asarray(params[name], jnp.float32)
  x = rng.standard_normal((B, L, D))
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  y = layer(jnp.asarray(x, jnp.float32), positions)
  np.testing.assert_allclose(np.asarray(y), np_attention(x, params, k, eps), rtol=1e-4,
                             atol=1e-5)


def np_masked_attention(q, k, v, mask):
  """q [B, L, H, K], k/v [B, S, G, K], mask [B, L, S] -> [B, L, H, K]; head h reads
  key-value head h // (H / G)."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('blhk,bshk->bhls', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhls,bshk->blhk', p, v)


def test_masked_attention_matches_numpy_with_a_cache_mask(rng):
  b, l, s, h, g, k = 2, 3, 7, 4, 2, 8
  q = rng.standard_normal((b, l, h, k)).astype(np.float32)
  keys = rng.standard_normal((b, s, g, k)).astype(np.float32)
  values = rng.standard_normal((b, s, g, k)).astype(np.float32)
  positions = np.array([[2, 3, 4], [0, 5, 6]], np.int32)
  mask = np.asarray(cache_mask(jnp.asarray(positions), s))
  np.testing.assert_array_equal(mask, np.arange(s)[None, None] <= positions[..., None])
  got = masked_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                   jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np_masked_attention(q, keys, values, mask),
                             rtol=1e-5, atol=1e-5)


def test_write_cache_writes_at_positions_and_drops_out_of_range(rng):
  cache = jnp.zeros((2, 4, 1, 2))
  new = jnp.asarray(rng.standard_normal((2, 2, 1, 2)), jnp.float32)
  out = np.asarray(write_cache(cache, new, jnp.asarray([[1, 2], [3, 4]])))
  np.testing.assert_array_equal(out[0, 1:3], np.asarray(new[0]))
  np.testing.assert_array_equal(out[1, 3], np.asarray(new[1, 0]))
  assert not out[0, [0, 3]].any() and not out[1, :3].any()
