"""The MoE layer (dispatch, experts, combine, shared experts) against NumPy loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain.model import experts as experts_lib
from moetrain.model import moe as moe_layer
from moetrain.model import moe_ffn as moe_lib
from moetrain.model import routing
from moetrain.model.layers import MLP

from conftest import assert_close, tiny_config

T, D, F, E = 48, 16, 24, 8


def np_expert(x, wg, wu, wd):
  g = x @ wg
  return ((g / (1 + np.exp(-g))) * (x @ wu)) @ wd


def np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def make_inputs(rng, t=T, e=E):
  x = rng.standard_normal((t, D)).astype(np.float32)
  router = (rng.standard_normal((D, e)) * 0.5).astype(np.float32)
  wg = (rng.standard_normal((e, D, F)) / np.sqrt(D)).astype(np.float32)
  wu = (rng.standard_normal((e, D, F)) / np.sqrt(D)).astype(np.float32)
  wd = (rng.standard_normal((e, F, D)) / np.sqrt(F)).astype(np.float32)
  return x, router, wg, wu, wd


def spec(**kw):
  base = dict(num_experts=E, top_k=2, router='token_choice', gate='softmax',
              softmax_order='softmax_topk', renormalize=False, routed_scaling=1.0,
              capacity_factor=1.0, eval_capacity_factor=1.0, drop_order='position',
              dropless=False, dropless_impl='padded', jitter=0.0,
              balance_scope='micro_batch')
  base.update(kw)
  return moe_lib.MoESpec(**base)


def run(s, x, router, wg, wu, wd, train=True, seq_len=T, dtype=jnp.float32):
  return moe_lib.moe_ffn(jnp.asarray(x), jnp.asarray(router), jnp.asarray(wg),
                         jnp.asarray(wu), jnp.asarray(wd), None, jax.random.key(0), spec=s,
                         seq_len=seq_len, train=train, dtype=dtype)


def reference_from_table(x, token_EC, weight_EC, wg, wu, wd):
  """y[t] = sum over slots (e, c) holding token t of weight * expert_e(x[t])."""
  y = np.zeros((x.shape[0], x.shape[1]))
  for e in range(token_EC.shape[0]):
    for c in range(token_EC.shape[1]):
      t = token_EC[e, c]
      if t < x.shape[0]:
        y[t] += weight_EC[e, c] * np_expert(x[t], wg[e], wu[e], wd[e])
  return y


def reference_dropless(x, router, wg, wu, wd, k):
  """Every token through each of its top-k experts, weighted by the softmax probability."""
  probs = np_softmax(x.astype(np.float64) @ router)
  y = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    for e in np.argsort(-probs[t], kind='stable')[:k]:
      y[t] += probs[t, e] * np_expert(x[t], wg[e], wu[e], wd[e])
  return y


@pytest.mark.parametrize('router,k,factor', [('token_choice', 1, 1.0),
                                             ('token_choice', 2, 0.75),
                                             ('expert_choice', 2, 1.0), ('soft', 2, 1.0)])
def test_layer_matches_loop_over_slots(router, k, factor, rng):
  x, r, wg, wu, wd = make_inputs(rng)
  s = spec(router=router, top_k=k, capacity_factor=factor)
  y, stats = run(s, x, r, wg, wu, wd)
  table, _ = routing.route(jnp.asarray(x) @ jnp.asarray(r), router=router, top_k=k,
                                   capacity=s.capacity(T, True))
  ref = reference_from_table(x, np.asarray(table.token_EC), np.asarray(table.weight_EC),
                             wg, wu, wd)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
  if router == 'token_choice' and factor < 1:
    assert float(stats['dropped_frac']) > 0


def test_dropped_tokens_get_zero_output(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  y, stats = run(spec(top_k=1, capacity_factor=0.25), x, r, wg, wu, wd)
  zero_rows = np.all(np.asarray(y) == 0, axis=1)
  assert zero_rows.mean() == pytest.approx(float(stats['dropped_frac']), abs=1e-6)


def test_dropless_equals_huge_capacity_and_loop_over_experts(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  r = r * 4  # very skewed routing: capacity mode at factor 1 would drop a lot.
  y_dropless, stats = run(spec(dropless=True), x, r, wg, wu, wd)
  y_big, big_stats = run(spec(capacity_factor=E), x, r, wg, wu, wd)
  ref = reference_dropless(x, r, wg, wu, wd, 2)
  assert float(stats['dropped_frac']) == 0 and float(big_stats['dropped_frac']) == 0
  np.testing.assert_allclose(np.asarray(y_dropless), ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(y_dropless), np.asarray(y_big), rtol=1e-6,
                             atol=1e-5)  # O(1) sums round to ~1e-6 absolute in float32
  _, small_stats = run(spec(capacity_factor=1.0), x, r, wg, wu, wd)
  assert float(small_stats['dropped_frac']) > 0


@pytest.mark.parametrize('k,gate', [(1, 'softmax'), (2, 'softmax'), (3, 'sigmoid')])
def test_dropless_eval_on_few_tokens_gathers_the_chosen_experts(k, gate, rng):
  """T * K < E at eval: each token runs its K experts with gathered weights; equals the
  per-token loop and the padded layer (training on the same tokens)."""
  t = 2
  x, r, wg, wu, wd = make_inputs(rng, t=t)
  s = spec(dropless=True, top_k=k, gate=gate)
  assert s.gathers(t, train=False) and not s.gathers(t, train=True)
  assert not s.gathers(-(-E // k), train=False)  # T * K >= E: padded buffers
  y, stats = run(s, x, r, wg, wu, wd, train=False, seq_len=t)
  y_padded, _ = run(s, x, r, wg, wu, wd, train=True, seq_len=t)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_padded), rtol=1e-5, atol=1e-5)
  if gate == 'softmax':
    np.testing.assert_allclose(np.asarray(y), reference_dropless(x, r, wg, wu, wd, k),
                               rtol=2e-5, atol=2e-5)
  assert float(stats['dropped_frac']) == 0


@pytest.mark.parametrize('gate,order,dtype,grouped_matmul', [
    ('softmax', 'softmax_topk', jnp.float32, 'xla'),
    ('softmax', 'topk_softmax', jnp.float32, 'xla'),
    ('sigmoid', 'softmax_topk', jnp.float32, 'xla'),
    ('softmax', 'softmax_topk', jnp.bfloat16, 'xla'),
    ('softmax', 'topk_softmax', jnp.float32, 'tokamax'),
    ('sigmoid', 'softmax_topk', jnp.bfloat16, 'tokamax')])
def test_ragged_dropless_equals_padded(gate, order, dtype, grouped_matmul, rng):
  """Grouped matmuls (jax.lax.ragged_dot or tokamax.ragged_dot) equal the padded buffers:
  output, statistics, and the gradients of the input and all three expert weights."""
  x, r, wg, wu, wd = make_inputs(rng)
  padded = spec(dropless=True, dropless_impl='padded', gate=gate, softmax_order=order)
  ragged = dataclasses.replace(padded, dropless_impl='ragged', grouped_matmul=grouped_matmul)
  auto = dataclasses.replace(ragged, dropless_impl='auto')
  assert ragged.use_ragged() and not padded.use_ragged()
  assert auto.use_ragged() == (grouped_matmul == 'tokamax')  # on CPU
  cot = rng.standard_normal((T, D)).astype(np.float32)

  def loss(s):
    def fn(x, wg, wu, wd):
      y, stats = run(s, x, r, wg, wu, wd, dtype=dtype)
      return jnp.sum(y.astype(jnp.float32) * cot), (y, stats)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(x, wg, wu, wd)

  jaxpr = str(jax.make_jaxpr(lambda x: run(ragged, x, r, wg, wu, wd, dtype=dtype))(x))
  assert ('custom_vjp_call' in jaxpr) == (grouped_matmul == 'tokamax')  # tokamax's op
  (_, (y_p, s_p)), g_p = loss(padded)
  (_, (y_r, s_r)), g_r = loss(ragged)
  assert_close(y_r, y_p, dtype, rtol=1e-5)
  for key in ('balance_loss', 'z_loss', 'dropped_frac'):
    np.testing.assert_allclose(float(s_r[key]), float(s_p[key]), rtol=1e-6)
  for got, want in zip(g_r, g_p):
    assert_close(got, want, dtype)


@pytest.mark.parametrize('impl', ['xla', 'tokamax'])
@pytest.mark.parametrize('sizes', [[3, 0, 5, 2], [0, 0, 0, 7], [0, 0, 0, 0]])
def test_padded_grouped_swiglu_equals_ragged_dot(sizes, impl, rng):
  """Rows grouped by expert (then unused rows) through padded buffers equal ragged_dot
  (jax.lax's or tokamax's), values and gradients; unused rows give zeros."""
  rows, d, f = 16, 6, 5
  sizes = jnp.asarray(sizes, jnp.int32)
  x = rng.standard_normal((rows, d)).astype(np.float32)
  ws = [rng.standard_normal(s).astype(np.float32) for s in ((4, d, f), (4, d, f), (4, f, d))]
  cot = rng.standard_normal((rows, d)).astype(np.float32)
  loss = lambda fn: jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2, 3))
  padded = lambda x, *w: experts_lib.padded_grouped_swiglu(x, *w, sizes, capacity=8)
  ragged = lambda x, *w: experts_lib.grouped_swiglu(x, *w, sizes, impl)
  ends = np.cumsum(np.asarray(sizes))
  expected = np.zeros((rows, d), np.float32)
  for l, (start, end) in enumerate(zip(ends - np.asarray(sizes), ends)):
    expected[start:end] = np_expert(x[start:end], *(w[l] for w in ws))
  np.testing.assert_allclose(np.asarray(padded(x, *ws)), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ragged(x, *ws)), expected, rtol=1e-4, atol=1e-5)
  (_, g_p), (_, g_r) = loss(padded)(x, *ws), loss(ragged)(x, *ws)
  for a, b in zip(g_p, g_r):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_eval_uses_eval_capacity_factor():
  s = spec(capacity_factor=0.5, eval_capacity_factor=2.0)
  assert s.capacity(T, train=True) == 6 and s.capacity(T, train=False) == 24


def test_jitter_only_in_training_and_changes_routing_inputs(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  s = spec(jitter=0.5)
  y_eval, _ = run(s, x, r, wg, wu, wd, train=False)
  y_plain, _ = run(spec(), x, r, wg, wu, wd, train=False)
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_plain))
  _, st_train = run(s, x, r, wg, wu, wd, train=True)
  _, st_plain = run(spec(), x, r, wg, wu, wd, train=True)
  assert float(st_train['z_loss']) != float(st_plain['z_loss'])


def test_sequence_balance_loss_is_mean_over_sequences(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  _, st_seq = run(spec(balance_scope='sequence'), x, r, wg, wu, wd, seq_len=12)
  per_seq = [float(run(spec(), x[i:i + 12], r, wg, wu, wd, seq_len=12)[1]['balance_loss'])
             for i in range(0, T, 12)]
  np.testing.assert_allclose(float(st_seq['balance_loss']), np.mean(per_seq), rtol=1e-6)


def np_expert_choice_taken(probs, capacity):
  """[T, E] 0/1: expert e takes its `capacity` most probable tokens (ties: lower index)."""
  taken = np.zeros_like(probs)
  for e in range(probs.shape[1]):
    taken[sorted(range(len(probs)), key=lambda t: (-probs[t, e], t))[:capacity], e] = 1
  return taken


def np_sequence_balance(taken, probs, seq_len):
  """Mean over sequences of E * sum_e f_e P_e; a sequence with no assignment has f = 0."""
  losses = []
  for start in range(0, len(taken), seq_len):
    counts, p = taken[start:start + seq_len].sum(0), probs[start:start + seq_len].mean(0)
    f = counts / counts.sum() if counts.sum() else np.zeros_like(counts)
    losses.append(len(counts) * np.sum(f * p))
  return np.mean(losses)


def test_expert_choice_sequence_without_assignments_is_finite_and_counted_as_dropped(rng):
  """Expert choice can leave a whole sequence without an expert: its balance loss term
  is 0 (not 0/0 = NaN), and its tokens are reported as dropped. Tokens 0-11 want expert
  0 most, 36-47 want it less and nothing else, 12-35 are near uniform: expert 0 fills up
  with 0-11, the others with 12-35, and sequence 3 (tokens 36-47) gets nothing."""
  x, _, wg, wu, wd = make_inputs(rng)
  logits = 0.05 * rng.standard_normal((T, E))
  logits[:12, 0] += 9.0
  logits[36:, 0] += 5.0
  router = np.zeros((D, E), np.float32)
  router[:E] = np.eye(E)
  x[:, :E], x[:, E:] = logits, 0.0
  s = spec(router='expert_choice', balance_scope='sequence', capacity_factor=1.0)
  _, stats = run(s, x, router, wg, wu, wd, seq_len=12)
  probs = np_softmax(x.astype(np.float64) @ router)
  taken = np_expert_choice_taken(probs, s.capacity(T, True))
  assert taken[36:].sum() == 0  # the situation under test.
  np.testing.assert_allclose(float(stats['balance_loss']),
                             np_sequence_balance(taken, probs, 12), rtol=1e-5)
  np.testing.assert_allclose(float(stats['dropped_frac']), np.mean(taken.max(1) == 0),
                             rtol=1e-6)
  grad = jax.grad(lambda r: run(s, x, r, wg, wu, wd, seq_len=12)[1]['balance_loss'])(
      jnp.asarray(router))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_expert_choice_dropped_frac_is_the_share_of_tokens_no_expert_took(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  for factor in (0.5, 1.0, 2.0):
    s = spec(router='expert_choice', capacity_factor=factor)
    _, stats = run(s, x, r, wg, wu, wd)
    taken = np_expert_choice_taken(np_softmax(x.astype(np.float64) @ r), s.capacity(T, True))
    np.testing.assert_allclose(float(stats['dropped_frac']), np.mean(taken.max(1) == 0),
                               atol=1e-6)


def test_shared_experts_add_a_dense_swiglu(rng):
  cfg = tiny_config(**{'model.moe.num_shared_experts': 2, 'model.moe.d_expert': 8,
                       'model.vocab_size': 128})
  layer = moe_layer.MoE(cfg.model, moe_lib.layer_specs(cfg.model)[0], rngs=nnx.Rngs(0),
                        dtype=jnp.float32, param_dtype=jnp.float32)
  assert layer.shared.w_gate.shape == (32, 16)  # two shared experts of hidden 8.
  x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
  y, _ = layer(x, train=False)
  shared = layer.shared
  layer.shared = None
  y_routed, _ = layer(x, train=False)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_routed + shared(x)), rtol=1e-6,
                             atol=1e-6)
  # Two shared experts of hidden 8 are one SwiGLU of hidden 16: check against two halves.
  xs = np.asarray(x).reshape(-1, 32)
  wg, wu, wd = (np.asarray(w[...]) for w in (shared.w_gate, shared.w_up, shared.w_down))
  halves = sum(np_expert(xs, wg[:, h], wu[:, h], wd[h]) for h in (slice(0, 8), slice(8, 16)))
  np.testing.assert_allclose(np.asarray(shared(x)).reshape(-1, 32), halves, rtol=1e-5,
                             atol=1e-5)
  assert isinstance(shared, MLP)


def test_shared_expert_gate_scales_the_shared_output_by_a_sigmoid(rng):
  cfg = tiny_config(**{'model.moe.num_shared_experts': 1, 'model.moe.shared_expert_gate': True,
                       'model.vocab_size': 128})
  layer = moe_layer.MoE(cfg.model, moe_lib.layer_specs(cfg.model)[0], rngs=nnx.Rngs(0),
                        dtype=jnp.float32, param_dtype=jnp.float32)
  assert layer.shared_gate.shape == (32, 1)
  gate = rng.standard_normal((32, 1)).astype(np.float32)
  layer.shared_gate[...] = jnp.asarray(gate)
  x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
  y, _ = layer(x, train=False)
  shared, layer.shared = layer.shared, None
  y_routed, _ = layer(x, train=False)
  xs = np.asarray(x).reshape(-1, 32)
  wg, wu, wd = (np.asarray(w[...]) for w in (shared.w_gate, shared.w_up, shared.w_down))
  expected = np_expert(xs, wg, wu, wd) / (1 + np.exp(-(xs @ gate)))
  np.testing.assert_allclose(np.asarray(y - y_routed).reshape(-1, 32), expected, rtol=1e-5,
                             atol=1e-5)


def test_statistics_report_load_and_router_state(rng):
  x, r, wg, wu, wd = make_inputs(rng)
  r[:, 0] += 3.0  # expert 0 is everyone's first choice.
  _, stats = run(spec(top_k=1, capacity_factor=1.0), x, r, wg, wu, wd)
  load = np.asarray(stats['load_E'])
  assert load.sum() == pytest.approx(1.0) and load[0] == load.max()
  assert float(stats['max_logit']) == pytest.approx(float(np.max(x @ r)), rel=1e-5)
  assert 0 < float(stats['router_entropy']) < np.log(E)


@pytest.mark.parametrize('loop_max', [0, E])
def test_experts_loop_and_batched_forms_agree(monkeypatch, loop_max, rng):
  """CPU runs up to CPU_EXPERT_LOOP_MAX experts as separate GEMMs, more as one batched
  einsum: both equal the NumPy experts, values and gradients."""
  monkeypatch.setattr(experts_lib, 'CPU_EXPERT_LOOP_MAX', loop_max)
  _, _, wg, wu, wd = make_inputs(rng)
  x_ECD = rng.standard_normal((E, 5, D)).astype(np.float32)
  got = np.asarray(experts_lib.experts(*map(jnp.asarray, (x_ECD, wg, wu, wd))))
  want = np.stack([np_expert(x_ECD[e], wg[e], wu[e], wd[e]) for e in range(E)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  loss = lambda *a: jnp.sum(experts_lib.experts(*a) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (x_ECD, wg, wu, wd)))
  monkeypatch.setattr(experts_lib, 'CPU_EXPERT_LOOP_MAX', E - loop_max)  # the other form
  other = jax.grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (x_ECD, wg, wu, wd)))
  for a, b in zip(grads, other):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('gate', ['sigmoid', 'softmax'])
def test_bias_balancing_lowers_load_imbalance_of_a_skewed_router(gate, rng):
  """A router skewed toward expert 0 (a constant input feature that only expert 0's column
  reads) keeps it overloaded step after step; the aux-loss-free bias, updated from each
  step's load exactly as the train step does, brings max/mean load close to 1."""
  t, e, steps = 512, 4, 150
  x, router, wg, wu, wd = make_inputs(rng, t, e)
  x[:, 0] = 1.0
  router[0] = 0.0
  router[0, 0] = 3.0
  s = spec(num_experts=e, top_k=1, gate=gate, capacity_factor=float(e))

  def balance(rate):
    def step(bias_E, _):
      _, stats = moe_lib.moe_ffn(x, router, wg, wu, wd, bias_E, jax.random.key(0), spec=s,
                                 seq_len=t, train=True, dtype=jnp.float32)
      load_E = stats['load_E']
      return routing.bias_update(bias_E, load_E, rate), load_E.max() * e
    return jax.lax.scan(step, jnp.zeros((e,), jnp.float32), length=steps)[1]

  run = jax.jit(balance, static_argnums=0)
  skewed, balanced = np.asarray(run(0.0)), np.asarray(run(0.01))
  assert skewed.min() > 2.2 and np.ptp(skewed) == 0  # no bias: the same skew every step.
  assert balanced[0] == skewed[0]
  assert balanced[-20:].mean() < 1.3, balanced[::10]


def np_top_k(x, router, k):
  """Each token's top-k experts (best first) and softmax weights, NumPy."""
  probs = np_softmax(x.astype(np.float64) @ router)
  expert_TK = np.argsort(-probs, axis=1, kind='stable')[:, :k]
  return expert_TK, np.take_along_axis(probs, expert_TK, axis=1)


@pytest.mark.parametrize('dropless,drop_order', [(True, 'position'), (False, 'position'),
                                                 (False, 'probability')])
def test_removed_experts_and_choices_get_zero_weight(dropless, drop_order, rng):
  """Ablation: removed assignments keep their slots (the same tokens drop) and add
  nothing; the others keep their weights. Reference: the loop over the unablated
  routing table with those slots' weights set to 0."""
  x, r, wg, wu, wd = make_inputs(rng)
  removed = tuple(int(e) for e in rng.choice(E, 2, replace=False))
  s = spec(dropless=dropless, drop_order=drop_order, capacity_factor=0.75,
           eval_capacity_factor=0.75)
  expert_TK, _ = np_top_k(x, r, 2)
  _, plain_stats = run(s, x, r, wg, wu, wd, train=False)
  table, _ = routing.route(jnp.asarray(x) @ jnp.asarray(r), router='token_choice', top_k=2,
                           capacity=s.capacity(T, False), drop_order=drop_order)
  for experts, choices in ((removed, ()), ((), (0,)), (removed[:1], (1,))):
    ablated = dataclasses.replace(s, remove_experts=experts, remove_choices=choices)
    y, stats = run(ablated, x, r, wg, wu, wd, train=False)
    assert float(stats['dropped_frac']) == float(plain_stats['dropped_frac'])
    token_EC, weight_EC = np.asarray(table.token_EC), np.asarray(table.weight_EC).copy()
    for e, c in np.ndindex(*token_EC.shape):
      t = token_EC[e, c]
      if t < T and (e in experts or list(expert_TK[t]).index(e) in choices):
        weight_EC[e, c] = 0.0
    ref = reference_from_table(x, token_EC, weight_EC, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


def test_eval_stats_hold_each_tokens_routed_experts(rng):
  cfg = tiny_config(**{'model.d_model': D, 'model.num_experts': E})
  layer = moe_layer.MoE(cfg.model, moe_lib.layer_specs(cfg.model)[0], rngs=nnx.Rngs(0),
                        dtype=jnp.float32, param_dtype=jnp.float32)
  x = rng.standard_normal((2, T // 2, D)).astype(np.float32)
  _, stats = layer(jnp.asarray(x), train=False)
  expert_TK, _ = np_top_k(x.reshape(T, D), np.asarray(layer.router[...]), 2)
  np.testing.assert_array_equal(np.asarray(stats['expert_TK']), expert_TK)
  np.testing.assert_allclose(np.asarray(stats['load_E']),
                             np.bincount(expert_TK.reshape(-1), minlength=E) / (2 * T))
  assert 'expert_TK' not in layer(jnp.asarray(x), train=True)[1]
