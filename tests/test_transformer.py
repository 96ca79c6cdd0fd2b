"""The decoder LM's cache path: attention against a NumPy reference, and prefill + one-token
decode steps equal the full forward (MoE dropless, dense, untied), with prompts of
different lengths in one batch."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import data as data_lib
from moetrain.model import attention
from moetrain.model.transformer import Transformer

from conftest import tiny_config

RNG = np.random.default_rng()


def np_attention(q, k, v, mask):
  """q [B, L, H, K], k/v [B, S, G, K], mask [B, L, S] -> [B, L, H, K]; head h reads
  key-value head h // (H / G)."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('blhk,bshk->bhls', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhls,bshk->blhk', p, v)


def test_masked_attention_matches_numpy_with_a_cache_mask():
  b, l, s, h, g, k = 2, 3, 7, 4, 2, 8
  q = RNG.standard_normal((b, l, h, k)).astype(np.float32)
  keys = RNG.standard_normal((b, s, g, k)).astype(np.float32)
  values = RNG.standard_normal((b, s, g, k)).astype(np.float32)
  positions = np.array([[2, 3, 4], [0, 5, 6]], np.int32)
  mask = np.asarray(attention.cache_mask(jnp.asarray(positions), s))
  np.testing.assert_array_equal(mask, np.arange(s)[None, None] <= positions[..., None])
  got = attention.masked_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                   jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np_attention(q, keys, values, mask),
                             rtol=1e-5, atol=1e-5)


def test_write_cache_writes_at_positions_and_drops_out_of_range():
  cache = jnp.zeros((2, 4, 1, 2))
  new = jnp.asarray(RNG.standard_normal((2, 2, 1, 2)), jnp.float32)
  out = np.asarray(attention.write_cache(cache, new, jnp.asarray([[1, 2], [3, 4]])))
  np.testing.assert_array_equal(out[0, 1:3], np.asarray(new[0]))
  np.testing.assert_array_equal(out[1, 3], np.asarray(new[1, 0]))
  assert not out[0, [0, 3]].any() and not out[1, :3].any()


@pytest.mark.parametrize('overrides', [
    {'model.moe.dropless': True},
    {'model.num_experts': 0, 'model.tie_embeddings': False},
    {'model.moe.dropless': True, 'model.moe.num_shared_experts': 1, 'model.first_k_dense': 1},
])
def test_prefill_and_decode_steps_equal_the_full_forward(overrides):
  """Row 0 has a 5-token prompt, row 1 a 3-token one (left-aligned, the rest of the block
  writes nothing); then 4 decode steps of one token per row. Batch 1 decodes through the
  gathered experts (T * K < E), batch 2 through padded buffers."""
  cfg = data_lib.resolve_vocab(tiny_config(**overrides))
  model = Transformer(cfg.model, rngs=nnx.Rngs(int(RNG.integers(1000))))
  tokens = RNG.integers(0, 256, (2, 9)).astype(np.int32)
  lengths = [5, 3]
  decode = nnx.jit(lambda m, *args: m.decode(*args))
  full = np.asarray(nnx.jit(lambda m, t: m(t, train=False)[0])(model, jnp.asarray(tokens)))
  window = 12
  block = np.zeros((2, window), np.int32)
  positions = np.full((2, window), window, np.int32)
  for b, n in enumerate(lengths):
    block[b, :n], positions[b, :n] = tokens[b, :n], np.arange(n)
  logits, cache = decode(model, jnp.asarray(block), jnp.asarray(positions),
                         model.init_cache(2, window))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], rtol=1e-4, atol=1e-5)
  for step in range(4):
    pos = np.asarray(lengths) + step
    logits, cache = decode(model, jnp.asarray(tokens[[0, 1], pos][:, None]),
                           jnp.asarray(pos[:, None]), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[[0, 1], pos], rtol=1e-4,
                               atol=1e-5)
  single, _ = decode(model, jnp.asarray(tokens[:1, :1]), jnp.zeros((1, 1), jnp.int32),
                     model.init_cache(1, window))
  np.testing.assert_allclose(np.asarray(single)[0, 0], full[0, 0], rtol=1e-4, atol=1e-5)
