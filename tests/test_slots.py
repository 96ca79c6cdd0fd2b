"""Gather-only dispatch and combine (moetrain.model.slots) against plain NumPy, values and
gradients, on fresh random routings with drops and empty slots."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.model import routing, slots


def random_routing(rng, t, e, k, factor):
  logits = rng.normal(size=(t, e)).astype(np.float32) * 3.0  # skewed: some experts overflow
  experts, weights, _ = routing.top_k_gates(jnp.asarray(logits), k)
  capacity = max(1, math.ceil(factor * t * k / e))
  return routing.capacity_routing(experts, weights, e, capacity)[0]


def np_dispatch(x, token):
  x_pad = np.concatenate([x, np.zeros_like(x[:1])])
  return x_pad[token]


def np_combine(y, token, weight, t):
  out = np.zeros((t + 1, y.shape[-1]), np.float64)
  for (e, c), tok in np.ndenumerate(token):
    out[tok] += weight[e, c] * y[e, c]
  return out[:t]


@pytest.mark.parametrize('t,e,k,factor', [(48, 8, 2, 0.75), (40, 4, 1, 1.5), (32, 16, 4, 1.0)])
def test_dispatch_and_combine_match_numpy_values_and_gradients(t, e, k, factor, rng):
  d = 16
  r = random_routing(rng, t, e, k, factor)
  token, weight_EC = np.asarray(r.token_EC), np.asarray(r.weight_EC)
  x = rng.normal(size=(t, d)).astype(np.float32)
  y = rng.normal(size=token.shape + (d,)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(slots.dispatch(x, r.token_EC, r.slot_TK)),
                                np_dispatch(x, token))
  y_TD = slots.combine(y, r.weight_TK, r.slot_TK, r.token_EC, r.weight_EC)
  np.testing.assert_allclose(np.asarray(y_TD), np_combine(y, token, weight_EC, t),
                             rtol=1e-5, atol=1e-5)

  # Gradients through random projections: against NumPy's transposes of the two tables.
  g_slots = rng.normal(size=y.shape).astype(np.float32)
  g_tokens = rng.normal(size=(t, d)).astype(np.float32)
  dx = jax.grad(lambda x: jnp.sum(slots.dispatch(x, r.token_EC, r.slot_TK) * g_slots))(x)
  ref_dx = np.zeros((t + 1, d))
  np.add.at(ref_dx, token, g_slots)
  np.testing.assert_allclose(np.asarray(dx), ref_dx[:t], rtol=1e-5, atol=1e-5)

  loss = lambda y, w: jnp.sum(slots.combine(y, w, r.slot_TK, r.token_EC, r.weight_EC) * g_tokens)
  dy, dw = jax.grad(loss, argnums=(0, 1))(y, r.weight_TK)
  g_pad = np.concatenate([g_tokens, np.zeros((1, d))])
  np.testing.assert_allclose(np.asarray(dy), weight_EC[..., None] * g_pad[token],
                             rtol=1e-5, atol=1e-6)
  slot = np.asarray(r.slot_TK)
  y_pad = np.concatenate([y.reshape(-1, d), np.zeros((1, d))])
  ref_dw = np.einsum('tkd,td->tk', y_pad[slot], g_tokens)
  np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(dw)[slot == token.size] == 0)  # dropped: no gradient


def test_bfloat16_rows_accumulate_in_float32(rng):
  t, e, k, d = 64, 4, 2, 8
  r = random_routing(rng, t, e, k, 2.0)
  y = jnp.asarray(rng.normal(size=r.token_EC.shape + (d,)), jnp.bfloat16)
  out = slots.combine(y, r.weight_TK, r.slot_TK, r.token_EC, r.weight_EC)
  assert out.dtype == jnp.float32
  ref = np_combine(np.asarray(y, np.float32), np.asarray(r.token_EC), np.asarray(r.weight_EC), t)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
  dx = jax.grad(lambda x: jnp.sum(slots.dispatch(x, r.token_EC, r.slot_TK).astype(
      jnp.float32)))(x)
  assert dx.dtype == jnp.bfloat16
  counts = np.bincount(np.asarray(r.token_EC).reshape(-1), minlength=t + 1)[:t]
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.repeat(counts[:, None], d, 1))
