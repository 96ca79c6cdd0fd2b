"""Dropless expert parallelism by ragged all-to-all (moetrain.parallel.ragged).

XLA:CPU has no ragged-all-to-all, so on CPU the collective is replaced by
`emulated_ragged_all_to_all`, written from the semantics in the docstring of
`jax.lax.ragged_all_to_all` and checked here against that docstring's own example and a
NumPy model of the same semantics. On a GPU, `bench/gpu_check.py` compares the real
collective with the emulation, and the ragged expert-parallel layer with the padded one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain import train
from moetrain.config import ConfigError
from moetrain.model import experts as experts_lib
from moetrain.model import moe_ffn as moe_lib
from moetrain.model import moe_parallel
from moetrain.parallel import mesh as mesh_lib, ragged

from conftest import assert_close, tiny_config
from ragged_emulation import emulated_ragged_all_to_all


def numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets,
                            recv_sizes):
  """The documented semantics on per-device NumPy arrays (lists indexed by device)."""
  num_devices = len(operands)
  per_device = len(input_offsets[0]) // num_devices
  for m in range(num_devices):  # the documented constraint between the two sizes
    for j in range(num_devices):
      for l in range(per_device):
        assert send_sizes[m][j * per_device + l] == recv_sizes[j][m * per_device + l]
  results = [o.copy() for o in outputs]
  for src in range(num_devices):
    for i in range(len(input_offsets[src])):
      dst = i // per_device
      data = operands[src][input_offsets[src][i]:input_offsets[src][i] + send_sizes[src][i]]
      results[dst][output_offsets[src][i]:output_offsets[src][i] + len(data)] = data
  return results


def axis_mesh(n):
  return jax.make_mesh((n,), ('x',), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def run_per_device(fn, mesh, *per_device_arrays):
  """fn on each device's slice: arrays are [n * rows, ...] stacked by device."""
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('x')))
  return np.asarray(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P('x'),
                                          out_specs=P('x')))(*map(put, per_device_arrays)))


def test_emulation_reproduces_the_documented_example():
  args = [np.array(a, dtype) for a, dtype in (
      ([1, 2, 2, 3, 4, 0], np.float32), ([0] * 8, np.float32), ([0, 1, 0, 1], np.int32),
      ([1, 2, 1, 1], np.int32), ([0, 0, 1, 2], np.int32), ([1, 1, 2, 1], np.int32))]
  fn = lambda *a: emulated_ragged_all_to_all(*a, axis_name='x')
  got = run_per_device(fn, axis_mesh(2), *args)
  np.testing.assert_array_equal(got, [1, 3, 0, 0, 2, 2, 4, 0])


def random_counts(rng, num_devices, num_experts, max_count=5):
  counts = rng.integers(0, max_count + 1, (num_devices, num_experts))
  counts[rng.random(counts.shape) < 0.3] = 0  # empty slices, too
  return counts.astype(np.int32)


@pytest.mark.parametrize('num_devices,num_experts', [(1, 4), (2, 4), (4, 8), (8, 8)])
def test_plan_groups_by_local_expert_and_returns_every_row(num_devices, num_experts, rng):
  counts = random_counts(rng, num_devices, num_experts)
  local = num_experts // num_devices
  top_k = 2
  tokens = max(1, -(-int(counts.sum(1).max()) // top_k))
  rows = ragged.receive_rows(tokens, top_k, num_devices, local)
  plans = [jax.tree.map(np.asarray, ragged.exchange_plan(jnp.asarray(counts), m))
           for m in range(num_devices)]
  # Sender p's sorted rows, labelled 1000*p + 10*e + i (i-th row for expert e).
  sent = [np.concatenate([[1000 * p + 10 * e + i for i in range(counts[p, e])]
                          for e in range(num_experts)] + [[]]).astype(np.float32)
          for p in range(num_devices)]
  recv = numpy_ragged_all_to_all(
      sent, [np.full(rows, -1.0) for _ in plans], *[[getattr(pl, name) for pl in plans]
      for name in ('input_offsets_E', 'send_sizes_E', 'output_offsets_E', 'recv_sizes_K')])
  for m, plan in enumerate(plans):
    experts = range(m * local, (m + 1) * local)
    expected = [1000 * p + 10 * e + i for e in experts for p in range(num_devices)
                for i in range(counts[p, e])]
    np.testing.assert_array_equal(recv[m][:len(expected)], expected)
    assert np.all(recv[m][len(expected):] == -1)
    np.testing.assert_array_equal(plan.group_sizes_L, counts[:, list(experts)].sum(0))
  back = numpy_ragged_all_to_all(
      recv, [np.full(len(s), -1.0) for s in sent], *[[getattr(pl, name) for pl in plans]
      for name in ('recv_offsets_K', 'recv_sizes_K', 'source_offsets_K', 'send_sizes_E')])
  for s, b in zip(sent, back):
    np.testing.assert_array_equal(b, s)


def test_emulation_equals_numpy_semantics_on_a_random_plan(rng):
  num_devices, num_experts = 4, 8
  counts = random_counts(rng, num_devices, num_experts)
  rows_in = int(counts.sum(1).max()) + 3
  rows = ragged.receive_rows(rows_in, 1, num_devices, 2)
  plans = [jax.tree.map(np.asarray, ragged.exchange_plan(jnp.asarray(counts), m))
           for m in range(num_devices)]
  operands = [rng.standard_normal(rows_in).astype(np.float32) for _ in plans]
  outputs = [rng.standard_normal(rows).astype(np.float32) for _ in plans]
  names = ('input_offsets_E', 'send_sizes_E', 'output_offsets_E', 'recv_sizes_K')
  expected = numpy_ragged_all_to_all(operands, outputs,
                                     *[[getattr(p, n) for p in plans] for n in names])
  fn = lambda *a: emulated_ragged_all_to_all(*a, axis_name='x')
  got = run_per_device(fn, axis_mesh(num_devices), np.concatenate(operands),
                       np.concatenate(outputs),
                       *[np.concatenate([getattr(p, n) for p in plans]) for n in names])
  np.testing.assert_array_equal(got, np.concatenate(expected))


@pytest.fixture
def emulated(monkeypatch):
  """Ragged all-to-all on CPU: the emulation, and the backend check says yes."""
  monkeypatch.setattr(ragged, 'ragged_all_to_all', emulated_ragged_all_to_all)
  monkeypatch.setattr(ragged, 'backend_supports_ragged_all_to_all', lambda: True)


def dropless_spec(impl, top_k=2, num_experts=8, chunk=0, grouped_matmul='xla'):
  return moe_lib.MoESpec(num_experts, top_k, 'token_choice', 'softmax', 'topk_softmax', False,
                         1.0, 1.0, 1.0, 'position', True, impl, 0.0, 'global', chunk,
                         grouped_matmul=grouped_matmul)


F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.mark.parametrize('impl,top_k,data,expert,chunk,grouped_matmul,dtype', [
    *[(impl, k, *mesh, 0, 'xla', F32) for impl in ('ragged', 'auto') for k in (1, 2)
      for mesh in ((1, 2), (2, 2), (1, 4), (2, 4), (1, 8))],
    ('ragged', 3, 2, 4, 0, 'xla', F32), ('auto', 3, 1, 8, 0, 'xla', F32),
    # tokens sent in chunks (16 or 8 tokens per device)
    ('ragged', 2, 1, 4, 4, 'xla', F32), ('auto', 2, 2, 4, 2, 'xla', F32),
    ('ragged', 1, 1, 8, 4, 'xla', F32),
    # tokamax.ragged_dot (auto takes it too), and bfloat16
    ('auto', 2, 2, 4, 0, 'tokamax', F32), ('ragged', 1, 1, 8, 4, 'tokamax', F32),
    ('auto', 2, 1, 4, 0, 'tokamax', BF16), ('ragged', 2, 2, 2, 0, 'xla', BF16)])
def test_ragged_expert_parallel_layer_equals_one_device(emulated, impl, top_k, data, expert,
                                                        chunk, grouped_matmul, dtype, rng):
  """Output, statistics and gradients (input and expert weights) of the dropless layer on a
  mesh equal the single-device padded layer on the whole batch. 'ragged' runs the local
  experts as grouped matmuls (`grouped_matmul`: jax.lax's or tokamax's ragged_dot), 'auto'
  (the GPU choice) on padded buffers with XLA's and as grouped matmuls with tokamax's;
  `chunk` exchanges the tokens in chunks. bfloat16: errors within 1% of the norm."""
  t, d, f, e = 64, 8, 16, 8
  x, r, wg, wu, wd = (rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-2] if len(s) > 2
                      else 1) for s in ((t, d), (d, e), (e, d, f), (e, d, f), (e, f, d)))
  mesh = jax.make_mesh((data, 1, expert), mesh_lib.AXES,
                       devices=jax.devices()[:data * expert],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  cotangent = rng.standard_normal((t, d)).astype(np.float32)

  def layer(spec):
    return lambda x, wg, wu, wd: moe_parallel.run_moe_ffn(
        x, r, wg, wu, wd, None, jax.random.key(0), spec=spec, seq_len=8, train=True,
        dtype=dtype)

  def objective(spec):
    def f(*args):
      y, stats = layer(spec)(*args)
      return jnp.sum(y.astype(jnp.float32) * cotangent) + stats['balance_loss'], (y, stats)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

  (_, (y_ref, s_ref)), g_ref = objective(dropless_spec('padded', top_k))(x, wg, wu, wd)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
    experts = [jax.device_put(w, NamedSharding(mesh, P('expert'))) for w in (wg, wu, wd)]
    spec = dropless_spec(impl, top_k, chunk=chunk, grouped_matmul=grouped_matmul)
    assert spec.use_ragged() == (impl == 'ragged' or grouped_matmul == 'tokamax')
    fn = objective(spec)
    hlo = fn.lower(xs, *experts).as_text()
    jaxpr = str(jax.make_jaxpr(layer(spec))(xs, *experts))
    (_, (y, stats)), grads = fn(xs, *experts)
  assert ('custom_vjp_call' in jaxpr) == (grouped_matmul == 'tokamax')  # tokamax's op
  assert 'ragged_all_to_all' not in hlo  # emulated on CPU ...
  assert 'all_to_all' not in hlo  # ... and no padded exchange
  assert_close(y, y_ref, dtype, rtol=1e-5)
  for key in ('balance_loss', 'z_loss', 'load_E', 'dropped_frac'):
    np.testing.assert_allclose(np.asarray(stats[key]), np.asarray(s_ref[key]), rtol=1e-5,
                               atol=1e-6, err_msg=key)
  for got, want in zip(grads, g_ref):
    assert_close(got, want, dtype)


def test_token_chunks_equal_one_call(rng):
  """`in_token_chunks` runs a per-token function chunk by chunk: same values and gradients
  as one call on all tokens."""
  t, d, k = 24, 5, 2
  x = rng.standard_normal((t, d)).astype(np.float32)
  expert = rng.integers(0, 4, (t, k)).astype(np.int32)
  weight = rng.random((t, k)).astype(np.float32)
  w = rng.standard_normal((4, d, d)).astype(np.float32)
  fn = lambda w: lambda x, e, g: jnp.einsum('tk,tkd->td', g, jnp.tanh(
      jnp.einsum('td,tkde->tke', x, w[e])))
  whole = lambda x, w: jnp.sum(jnp.sin(fn(w)(x, expert, weight)))
  chunked = lambda x, w: jnp.sum(jnp.sin(experts_lib.in_token_chunks(fn(w), x, expert, weight, 8)))
  want = jax.value_and_grad(whole, argnums=(0, 1))(x, w)
  got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(x, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_expert_chunk_must_divide_the_tokens_per_device():
  cfg = tiny_config(**{'model.moe.dropless': True, 'model.moe.expert_chunk': 48,
                       'mesh.data': 2, 'mesh.expert': 4})
  with pytest.raises(ConfigError, match=r'model\.moe\.expert_chunk=48 does not divide the 32 '
                     'tokens each device routes'):
    train.prepare(cfg)


def test_train_step_lowers_to_ragged_all_to_all(monkeypatch):
  """With the real collective (lowered, not compiled: XLA:CPU cannot run it), the dropless
  train step sends tokens by ragged all-to-all and never gathers expert weights."""
  monkeypatch.setattr(ragged, 'backend_supports_ragged_all_to_all', lambda: True)
  cfg = tiny_config(**{'model.moe.dropless': True, 'model.moe.dropless_impl': 'ragged',
                       'model.num_experts': 8, 'model.vocab_size': 128, 'mesh.data': 2,
                       'mesh.expert': 4})
  mesh = mesh_lib.make_mesh(cfg)
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, state, shardings = state_lib.init_state(cfg, mesh, tx)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = jax.device_put(dict(inputs=np.zeros(shape, np.int32),
                              targets=np.zeros(shape, np.int32),
                              mask=np.ones(shape, np.float32)),
                         mesh_lib.batch_sharding(mesh))
  step_fn = jax.jit(step_lib.make_train_step(graphdef, tx, cfg), out_shardings=(shardings, None))
  with jax.set_mesh(mesh):
    text = step_fn.lower(state, batch).as_text()
  # forward and back in each of the 2 MoE layers, and the same two in the backward pass.
  assert text.count('ragged_all_to_all') >= 8
  m = cfg.model
  full = f'{m.num_experts}x{m.d_model}x{m.d_ff}'
  gathers = [line for line in text.splitlines() if 'all_gather' in line]
  assert gathers and not any(full in line for line in gathers)


@pytest.mark.parametrize('overrides,message', [
    ({'model.moe.dropless_impl': 'ragged'}, "dropless_impl='ragged' with mesh.expert=4 needs"),
    ({'model.moe.grouped_matmul': 'tokamax'},
     "grouped_matmul='tokamax' with mesh.expert=4 needs .* set grouped_matmul='xla'")])
def test_ragged_dropless_needs_a_backend_with_ragged_all_to_all(overrides, message):
  cfg = tiny_config(**{'model.moe.dropless': True, 'mesh.data': 2, 'mesh.expert': 4,
                       **overrides})
  with pytest.raises(ConfigError, match=message):
    train.prepare(cfg)


def test_dropless_says_ragged_all_to_all_once(emulated, caplog):
  mesh = jax.make_mesh((1, 1, 2), mesh_lib.AXES, devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  moe_parallel.log_dropless_choice.cache_clear()
  x = np.zeros((16, 8), np.float32)
  w = np.zeros((8, 8, 4), np.float32)
  layer = lambda x: moe_parallel.run_moe_ffn(x, np.zeros((8, 8), np.float32), w, w,
                                             w.transpose(0, 2, 1), None, jax.random.key(0),
                                             spec=dropless_spec('ragged'), seq_len=4,
                                             train=True, dtype=jnp.float32)
  with jax.set_mesh(mesh):
    for _ in range(2):
      jax.eval_shape(layer, x)
  messages = [r.getMessage() for r in caplog.records if 'dropless' in r.getMessage()]
  assert len(messages) == 1 and 'ragged all-to-all' in messages[0]
  assert 'ragged_dot' in messages[0]


def test_auto_picks_the_exchange_and_the_expert_kernel_per_backend(monkeypatch):
  spec = dropless_spec('auto')
  assert not spec.use_ragged_exchange() and not spec.use_ragged()  # CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert spec.use_ragged_exchange() and not spec.use_ragged()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert spec.use_ragged_exchange() and spec.use_ragged()
  for impl in ('padded', 'ragged'):
    forced = dropless_spec(impl)
    assert forced.use_ragged_exchange() == forced.use_ragged() == (impl == 'ragged')


@pytest.mark.parametrize('impl', ['auto', 'ragged'])
def test_dropless_training_on_meshes_matches_one_device(emulated, impl, rng):
  """Loss, gradients and params after 3 train steps of the dropless Mixtral-style model,
  tokens exchanged by (emulated) ragged all-to-all, equal the single-device run."""
  from test_dispatch import assert_meshes_match_one_device
  assert_meshes_match_one_device(rng, 'mixtral', [(2, 1, 4), (1, 1, 8)],
                                 **{'model.moe.dropless_impl': impl})
