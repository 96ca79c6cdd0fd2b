"""Attention implementations: each equals a NumPy reference (causal, grouped-query, and
per-document with segment ids), values and gradients; the backend picks for `auto`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain.config import ConfigError
from moetrain.model import attention
from moetrain.parallel import mesh as mesh_lib

B, L, H, G, K = 2, 128, 4, 2, 16  # the splash kernel needs L a multiple of 128.


def inputs(rng, segments: bool):
  q = rng.standard_normal((B, L, H, K)).astype(np.float32)
  k = rng.standard_normal((B, L, G, K)).astype(np.float32)
  v = rng.standard_normal((B, L, G, K)).astype(np.float32)
  # Documents of random lengths per row (ids rise along the row, as packing makes them).
  seg = np.cumsum(rng.random((B, L)) < 0.05, axis=1).astype(np.int32) if segments else None
  return q, k, v, seg


def numpy_attention(q, k, v, seg):
  """Loop reference: query head h reads key-value head h // (H / G)."""
  out = np.zeros_like(q)
  rep = q.shape[2] // k.shape[2]
  for b in range(q.shape[0]):
    allowed = np.tril(np.ones((L, L), bool))
    if seg is not None:
      allowed &= seg[b][:, None] == seg[b][None, :]
    for h in range(q.shape[2]):
      s = q[b, :, h] @ k[b, :, h // rep].T / np.sqrt(K)
      s = np.where(allowed, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // rep]
  return out


IMPLS = {
    'xla': attention.xla_attention,
    'dot_product': attention.dot_product_attention,
    # The Pallas TPU kernel itself, run by the Pallas interpreter on CPU.
    'splash': lambda *a: attention.splash_attention(*a, interpret=True),
}


@pytest.mark.parametrize('segments', [False, True])
@pytest.mark.parametrize('impl', list(IMPLS))
def test_attention_equals_numpy_reference(impl, segments, rng):
  q, k, v, seg = inputs(rng, segments)
  fn = IMPLS[impl]
  got = np.asarray(jax.jit(fn)(q, k, v, seg))
  np.testing.assert_allclose(got, numpy_attention(q, k, v, seg), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('impl', ['dot_product', 'splash'])
def test_attention_gradients_equal_the_xla_path(impl, rng):
  q, k, v, seg = inputs(rng, True)
  cot = rng.standard_normal((B, L, H, K)).astype(np.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cot)
  want = jax.grad(loss(IMPLS['xla']), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(IMPLS[impl]), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip('qkv', got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4,
                               err_msg=name)


def test_splash_runs_per_device_on_a_mesh(rng):
  """Under a mesh the kernel runs under shard_map over the batch axes: same result."""
  q, k, v, seg = inputs(rng, True)
  mesh = jax.make_mesh((1, 2, 1), mesh_lib.AXES, devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
    got = jax.jit(IMPLS['splash'])(*map(put, (q, k, v, seg)))
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, seg), rtol=2e-4,
                             atol=2e-5)


@pytest.mark.parametrize('platform,dtype,seq_len,expected', [
    ('cpu', 'float32', 128, 'xla'),
    ('cpu', 'bfloat16', 128, 'xla'),
    ('gpu', 'bfloat16', 100, 'cudnn'),
    ('gpu', 'float32', 128, 'xla'),
    ('tpu', 'bfloat16', 4096, 'splash'),
    ('tpu', 'float32', 100, 'xla'),
])
def test_auto_picks_by_backend(platform, dtype, seq_len, expected):
  assert attention.choose_impl('auto', seq_len=seq_len, dtype=dtype,
                               platform=platform) == expected


@pytest.mark.parametrize('impl,platform,dtype,seq_len,message', [
    ('cudnn', 'cpu', 'bfloat16', 128, r"attention_impl='cudnn' needs a GPU"),
    ('cudnn', 'gpu', 'float32', 128, r"needs a GPU and model\.dtype='bfloat16'"),
    ('splash', 'tpu', 'bfloat16', 100, r'data\.seq_len a multiple of 128'),
    ('splash', 'cpu', 'float32', 128, r"attention_impl='splash' needs a TPU"),
])
def test_kernels_a_backend_lacks_are_config_errors(impl, platform, dtype, seq_len, message):
  with pytest.raises(ConfigError, match=message):
    attention.choose_impl(impl, seq_len=seq_len, dtype=dtype, platform=platform)
