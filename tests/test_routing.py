"""Routers and aux losses against plain NumPy loop references on fresh random inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.model import routing


def random_logits(rng, t, e, scale=2.0):
  return (rng.standard_normal((t, e)) * scale).astype(np.float32)


def np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_top_k(scores_row, k):
  """Indices of the k largest entries, largest first, ties to the lower index."""
  return sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], i))[:k]


def ref_gates(logits, k, gate, order, renormalize, scaling, bias):
  t, e = logits.shape
  scores = np_softmax(logits) if gate == 'softmax' else 1 / (1 + np.exp(-logits))
  experts = np.zeros((t, k), np.int64)
  weights = np.zeros((t, k), np.float64)
  for i in range(t):
    select = scores[i] + (bias if bias is not None else 0)
    chosen = np_top_k(select, k)
    experts[i] = chosen
    if gate == 'softmax' and order == 'topk_softmax':
      w = np_softmax(logits[i, chosen][None])[0]
    else:
      w = scores[i, chosen]
      if renormalize or gate == 'sigmoid':
        w = w / w.sum()
    weights[i] = w * scaling
  return experts, weights


def ref_capacity(experts, weights, num_experts, capacity, drop_order):
  """Loop reference: choice-major, tokens in position or descending top-1 weight order."""
  t, k = experts.shape
  if drop_order == 'position':
    order = list(range(t))
  else:
    order = sorted(range(t), key=lambda i: (-weights[i, 0], i))
  token = np.full((num_experts, capacity), t)
  weight = np.zeros((num_experts, capacity))
  fill = np.zeros(num_experts, int)
  for j in range(k):
    for i in order:
      ex = experts[i, j]
      if fill[ex] < capacity:
        token[ex, fill[ex]], weight[ex, fill[ex]] = i, weights[i, j]
        fill[ex] += 1
  return token, weight, fill.sum()


@pytest.mark.parametrize('gate,order,renormalize,scaling,use_bias', [
    ('softmax', 'softmax_topk', False, 1.0, False),
    ('softmax', 'softmax_topk', True, 1.0, False),
    ('softmax', 'topk_softmax', False, 1.0, False),
    ('sigmoid', 'softmax_topk', False, 2.5, False),
    ('sigmoid', 'softmax_topk', False, 1.0, True),
    ('softmax', 'softmax_topk', False, 1.0, True),
])
@pytest.mark.parametrize('k', [1, 2, 3])
def test_top_k_gates_match_reference(gate, order, renormalize, scaling, use_bias, k, rng):
  t, e = 64, 8
  logits = random_logits(rng, t, e)
  bias = (rng.standard_normal(e) * 0.3).astype(np.float32) if use_bias else None
  experts, weights, probs = routing.top_k_gates(
      jnp.asarray(logits), k, gate=gate, softmax_order=order, renormalize=renormalize,
      routed_scaling=scaling, bias_E=None if bias is None else jnp.asarray(bias))
  ref_e, ref_w = ref_gates(logits.astype(np.float64), k, gate, order, renormalize,
                           scaling, bias)
  np.testing.assert_array_equal(np.asarray(experts), ref_e)
  np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6, atol=1e-6)
  ref_scores = np_softmax(logits) if gate == 'softmax' else 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(np.asarray(probs), ref_scores / ref_scores.sum(-1, keepdims=True),
                             rtol=1e-6, atol=1e-6)


def test_bias_changes_selection_not_weights(rng):
  logits = random_logits(rng, 32, 4)
  bias = np.array([5.0, 0, 0, 0], np.float32)  # expert 0 wins every selection.
  experts, weights, _ = routing.top_k_gates(jnp.asarray(logits), 1, gate='sigmoid',
                                            bias_E=jnp.asarray(bias), renormalize=False)
  assert np.all(np.asarray(experts)[:, 0] == 0)
  np.testing.assert_allclose(np.asarray(weights), 1.0, rtol=1e-6)  # normalized over k=1
  experts2, weights2, _ = routing.top_k_gates(jnp.asarray(logits), 2, gate='softmax',
                                              bias_E=jnp.asarray(bias))
  probs = np_softmax(logits)
  np.testing.assert_allclose(np.asarray(weights2)[:, 0], probs[:, 0], rtol=1e-6)


@pytest.mark.parametrize('drop_order', ['position', 'probability'])
@pytest.mark.parametrize('t,e,k,factor', [(64, 8, 1, 1.0), (64, 8, 2, 1.25), (48, 6, 2, 0.5),
                                          (40, 4, 3, 2.0), (33, 16, 2, 1.0)])
def test_capacity_routing_matches_loop(drop_order, t, e, k, factor, rng):
  logits = random_logits(rng, t, e, scale=3.0)  # skewed, so some experts overflow.
  experts, weights, _ = routing.top_k_gates(jnp.asarray(logits), k)
  capacity = max(1, min(t, math.ceil(factor * t * k / e)))
  r, kept = routing.capacity_routing(experts, weights, e, capacity, drop_order)
  ref_token, ref_weight, ref_kept = ref_capacity(np.asarray(experts), np.asarray(weights),
                                                 e, capacity, drop_order)
  np.testing.assert_array_equal(np.asarray(r.token_EC), ref_token)
  np.testing.assert_allclose(np.asarray(r.weight_EC), ref_weight, rtol=1e-6, atol=1e-7)
  assert float(kept) == ref_kept
  # The table the other way round: each kept assignment's slot holds its token and belongs
  # to its expert; every filled slot is some assignment's; dropped ones point past the end.
  slot = np.asarray(r.slot_TK)
  kept_mask = slot < e * capacity
  assert kept_mask.sum() == ref_kept
  tokens, choices = np.nonzero(kept_mask)
  np.testing.assert_array_equal(ref_token.reshape(-1)[slot[kept_mask]], tokens)
  np.testing.assert_array_equal(slot[kept_mask] // capacity, np.asarray(experts)[tokens, choices])
  assert np.all(slot[~kept_mask] == e * capacity)
  assert sorted(slot[kept_mask]) == sorted(np.nonzero(ref_token.reshape(-1) < t)[0])
  np.testing.assert_array_equal(np.asarray(r.weight_TK), np.asarray(weights))


def test_probability_order_keeps_confident_tokens():
  logits = np.zeros((8, 2), np.float32)
  logits[:, 0] = np.arange(8)  # all tokens prefer expert 0; later tokens more confidently.
  experts, weights, _ = routing.top_k_gates(jnp.asarray(logits), 1)
  by_pos, _ = routing.capacity_routing(experts, weights, 2, 3, 'position')
  by_prob, _ = routing.capacity_routing(experts, weights, 2, 3, 'probability')
  assert list(np.asarray(by_pos.token_EC)[0]) == [0, 1, 2]
  assert list(np.asarray(by_prob.token_EC)[0]) == [7, 6, 5]


def test_slot_positions_count_earlier_same_expert(rng):
  expert = rng.integers(0, 5, size=200)
  pos = np.asarray(routing.slot_positions(jnp.asarray(expert, jnp.int32), 5))
  ref = [int(np.sum(expert[:i] == expert[i])) for i in range(len(expert))]
  np.testing.assert_array_equal(pos, ref)


@pytest.mark.parametrize('t,e,capacity', [(32, 4, 8), (50, 8, 3), (16, 16, 5)])
def test_expert_choice_matches_loop(t, e, capacity, rng):
  logits = random_logits(rng, t, e)
  r = routing.expert_choice_routing(jnp.asarray(logits), capacity)
  probs = np_softmax(logits.astype(np.float64))
  for ex in range(e):
    ref = sorted(range(t), key=lambda i: (-probs[i, ex], i))[:capacity]
    np.testing.assert_array_equal(np.asarray(r.token_EC)[ex], ref)
    np.testing.assert_allclose(np.asarray(r.weight_EC)[ex], probs[ref, ex], rtol=1e-6)


def test_expert_choice_lets_a_token_take_zero_or_many_experts():
  logits = np.full((8, 4), -5.0, np.float32)
  logits[0] = 5.0  # token 0 is everyone's favourite.
  r, stats = routing.route(jnp.asarray(logits), router='expert_choice', top_k=1, capacity=1)
  assert np.all(np.asarray(r.token_EC) == 0)
  taken = np.asarray(stats.assign_TE)
  assert taken[0].sum() == 4 and taken[1:].sum() == 0


def test_soft_routing_is_every_expert_on_every_token(rng):
  logits = random_logits(rng, 10, 3)
  r = routing.soft_routing(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(r.token_EC), np.tile(np.arange(10), (3, 1)))
  np.testing.assert_allclose(np.asarray(r.weight_EC), np_softmax(logits).T, rtol=1e-6)


def ref_balance(probs, experts, num_experts):
  t, k = experts.shape
  frac = np.zeros(num_experts)
  for i in range(t):
    for j in range(k):
      frac[experts[i, j]] += 1.0 / (t * k)
  mean_prob = probs.mean(0)
  return num_experts * sum(frac[i] * mean_prob[i] for i in range(num_experts))


@pytest.mark.parametrize('k', [1, 2])
def test_balance_loss_matches_reference(k, rng):
  t, e = 128, 8
  logits = random_logits(rng, t, e)
  experts, _, probs = routing.top_k_gates(jnp.asarray(logits), k)
  assign = routing.assignment_mask(experts, e)
  counts = jnp.sum(assign, 0)
  loss = routing.balance_loss((counts / counts.sum())[None], jnp.mean(probs, 0)[None])
  ref = ref_balance(np.asarray(probs, np.float64), np.asarray(experts), e)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-6)


def test_balance_loss_is_one_when_uniform_and_has_gradient_only_through_probs():
  e = 4
  frac = jnp.full((1, e), 1 / e)
  probs = jnp.full((1, e), 1 / e)
  assert float(routing.balance_loss(frac, probs)) == pytest.approx(1.0)
  g_frac, g_prob = jax.grad(lambda f, p: routing.balance_loss(f, p), argnums=(0, 1))(frac, probs)
  assert np.all(np.asarray(g_frac) == 0)
  np.testing.assert_allclose(np.asarray(g_prob), e * np.asarray(frac), rtol=1e-6)


def test_z_loss_matches_reference(rng):
  logits = random_logits(rng, 64, 8, scale=4.0)
  ref = np.mean([np.log(np.sum(np.exp(row.astype(np.float64)))) ** 2 for row in logits])
  np.testing.assert_allclose(float(routing.z_loss(jnp.asarray(logits))), ref, rtol=1e-6)


def test_router_entropy_matches_reference(rng):
  probs = np_softmax(random_logits(rng, 20, 6))
  ref = np.mean([-sum(p * np.log(p) for p in row) for row in probs.astype(np.float64)])
  np.testing.assert_allclose(float(routing.router_entropy(jnp.asarray(probs))), ref,
                             rtol=1e-6)


def test_bias_update_moves_toward_equal_load():
  bias = jnp.zeros(4)
  load = jnp.array([0.7, 0.1, 0.1, 0.1])
  new = np.asarray(routing.bias_update(bias, load, 0.01))
  np.testing.assert_allclose(new, [-0.01, 0.01, 0.01, 0.01])


def test_capacity_rule():
  assert routing.capacity(64, 8, 2, 1.25) == 20  # ceil(1.25 * 64 * 2 / 8)
  assert routing.capacity(64, 8, 1, 1.0) == 8
  assert routing.capacity(10, 8, 1, 0.01) == 1  # at least one slot
  assert routing.capacity(16, 2, 2, 4.0) == 16  # at most every token
  assert routing.capacity(50, 10, 2, 1.1) == 11  # not 12: 1.1 * 100 / 10 is exactly 11


def test_capacity_is_exact_for_decimal_factors(rng):
  """ceil(cf * T * k / E) in integers (cf = tenths / 10) over a grid where many products
  land exactly on an integer; float arithmetic added a slot in 37 of these cases."""
  for tenths in range(1, 31):
    factor = float(f'{tenths / 10:.1f}')
    for tokens in range(1, 129):
      for experts in (1, 2, 3, 4, 6, 8, 10, 16, 32, 64):
        for k in (k for k in (1, 2, 4) if k <= experts):
          want = max(1, min(tokens, -(-tenths * tokens * k // (10 * experts))))
          assert routing.capacity(tokens, experts, k, factor) == want, (
              factor, tokens, k, experts)
  # and random factors with up to 3 decimals.
  for _ in range(2000):
    places = int(rng.integers(1, 4))
    digits = int(rng.integers(1, 5 * 10**places))
    factor = float(f'{digits / 10**places:.{places}f}')
    tokens, experts = int(rng.integers(1, 300)), int(rng.integers(1, 65))
    k = int(rng.integers(1, experts + 1))
    want = max(1, min(tokens, -(-digits * tokens * k // (10**places * experts))))
    assert routing.capacity(tokens, experts, k, factor) == want, (factor, tokens, k, experts)
