"""The decoder LM's cache path: prefill + one-token decode steps equal the full forward
(MoE dropless, dense, untied, Qwen attention options, scanned layers), with prompts of different lengths
in one batch."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import data as data_lib
from moetrain.model.transformer import Transformer

from conftest import tiny_config


@pytest.mark.parametrize('overrides', [
    {'model.moe.dropless': True},
    {'model.num_experts': 0, 'model.tie_embeddings': False},
    {'model.moe.dropless': True, 'model.moe.num_shared_experts': 1, 'model.first_k_dense': 1,
     'model.qkv_bias': True, 'model.qk_norm': True, 'model.head_dim': 16},
    # scanned: a dense run and a MoE run, decoded layer by layer from the stacks.
    {'model.moe.dropless': True, 'model.num_layers': 3, 'model.first_k_dense': 1,
     'model.scan_layers': True},
])
def test_prefill_and_decode_steps_equal_the_full_forward(overrides, rng):
  """Row 0 has a 5-token prompt, row 1 a 3-token one (left-aligned, the rest of the block
  writes nothing); then 4 decode steps of one token per row. Batch 1 decodes through the
  gathered experts (T * K < E), batch 2 through padded buffers."""
  cfg = data_lib.resolve_vocab(tiny_config(**overrides))
  model = Transformer(cfg.model, rngs=nnx.Rngs(int(rng.integers(1000))))
  tokens = rng.integers(0, 256, (2, 9)).astype(np.int32)
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
