"""The objective: cross-entropy against NumPy, and the chunked cross-entropy equal to the
plain one in value and gradients without ever holding the whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import objective
from moetrain.model.transformer import output_logits

B, L, D, V = 2, 24, 8, 40


def numpy_cross_entropy_sum(logits, targets, mask):
  logits = logits.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return float(((logz - picked) * mask).sum())


def draw(rng):
  x = rng.standard_normal((B, L, D)).astype(np.float32)
  w = rng.standard_normal((V, D)).astype(np.float32)
  targets = rng.integers(0, V, (B, L)).astype(np.int32)
  mask = (rng.random((B, L)) < 0.8).astype(np.float32)
  return x, w, targets, mask


def test_cross_entropy_equals_numpy(rng):
  _, _, targets, mask = draw(rng)
  logits = 3 * rng.standard_normal((B, L, V)).astype(np.float32)
  want = numpy_cross_entropy_sum(logits, targets, mask)
  assert float(objective.cross_entropy_sum(logits, targets, mask)) == pytest.approx(want,
                                                                                   rel=1e-5)
  assert float(objective.cross_entropy(logits, targets, mask)) == pytest.approx(
      want / mask.sum(), rel=1e-5)


@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('chunk', [1, 8, 24])
def test_chunked_cross_entropy_equals_plain_value_and_gradients(chunk, tied, rng):
  x, w, targets, mask = draw(rng)
  if not tied:
    w = w.T.copy()  # the unembedding [D, V]

  def plain(x, w):
    logits = output_logits(x, w=w, tied=tied, dtype=jnp.float32)
    return objective.cross_entropy_sum(logits, targets, mask)

  def chunked(x, w):
    logits_fn = lambda x_BCD: output_logits(x_BCD, w=w, tied=tied, dtype=jnp.float32)
    return objective.chunked_cross_entropy_sum(x, targets, mask, logits_fn, chunk)

  logits = np.einsum('bld,vd->blv', x, w) if tied else x @ w
  want = numpy_cross_entropy_sum(logits, targets, mask)
  assert float(jax.jit(chunked)(x, w)) == pytest.approx(want, rel=1e-5)
  got_grads = jax.jit(jax.grad(chunked, argnums=(0, 1)))(x, w)
  want_grads = jax.grad(plain, argnums=(0, 1))(x, w)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_never_holds_the_whole_logits(rng):
  """The compiled gradient has no [B, L, V] array; its largest logits block is a chunk."""
  x, w, targets, mask = draw(rng)
  logits_fn = lambda x_BCD: output_logits(x_BCD, w=w, tied=True, dtype=jnp.float32)
  loss = lambda x: objective.chunked_cross_entropy_sum(x, targets, mask, logits_fn, 4)
  hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
  assert f'f32[{B},{L},{V}]' not in hlo and f'f32[{B * L},{V}]' not in hlo
  assert f'f32[{B * 4},{V}]' in hlo or f'f32[{B},4,{V}]' in hlo
