"""Expert parallelism and FSDP: the same config on any (data, fsdp, expert) mesh of
simulated devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain import config as config_lib
from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain import train
from moetrain.config import ConfigError
from moetrain.model import moe_ffn as moe_lib
from moetrain.model import moe_parallel
from moetrain.parallel import mesh as mesh_lib

from conftest import tiny_config

MESHES = [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 1, 4), (2, 1, 4), (1, 1, 8)]  # data, fsdp, expert
FSDP_MESHES = [(1, 2, 1), (1, 4, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
FAMILIES = {
    'switch': {'model.moe.top_k': 1},
    'gshard': {'model.moe.top_k': 2},
    'mixtral': {'model.moe.softmax_order': 'topk_softmax', 'model.moe.dropless': True},
    'deepseek': {'model.moe.gate': 'sigmoid', 'model.moe.bias_update_rate': 0.01,
                 'model.moe.num_shared_experts': 1, 'model.moe.d_expert': 16},
    'expert_choice': {'model.moe.router': 'expert_choice'},
    'soft': {'model.moe.router': 'soft'},
}


def equivalence_config(family, data, expert, fsdp=1):
  """Capacity so large nothing drops, and global balancing, so meshes must agree."""
  return tiny_config(**{
      'model.vocab_size': 128, 'model.d_model': 16, 'model.num_heads': 2,
      'model.num_kv_heads': 1, 'model.d_ff': 32, 'model.num_layers': 1,
      'model.num_experts': 8, 'model.moe.capacity_factor': 8.0,
      'model.moe.eval_capacity_factor': 8.0, 'model.moe.balance_scope': 'global',
      'data.seq_len': 8, 'data.batch_size': 8, 'mesh.data': data, 'mesh.fsdp': fsdp,
      'mesh.expert': expert, **FAMILIES[family]})


def random_batches(rng, cfg, n):
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  return [dict(inputs=rng.integers(0, 100, shape).astype(np.int32),
               targets=rng.integers(0, 100, shape).astype(np.int32),
               mask=np.ones(shape, np.float32)) for _ in range(n)]


def initial_state(cfg):
  """The initial train state on one device (resharded onto each mesh by run_steps)."""
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  return state_lib.init_state(cfg, mesh, optimizer_lib.make_optimizer(cfg.train))[:2]


def run_steps(cfg, graphdef, state, batches):
  """Loss and gradients at the initial params, then the losses of len(batches) steps and
  the final params and router biases, on the config's mesh (first data*expert devices).
  One jit: the gradient, then the steps as a scan."""
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.expert
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])
  tx = optimizer_lib.make_optimizer(cfg.train)
  grad_fn = jax.value_and_grad(step_lib.make_loss_fn(graphdef, cfg), has_aux=True)
  step_fn = step_lib.make_train_step(graphdef, tx, cfg)

  @jax.jit
  def run(state, batches):
    first = jax.tree.map(lambda x: x[0], batches)
    (loss0, _), grads = grad_fn(state.params, state.model_state, first, jax.random.key(0))
    state, metrics = jax.lax.scan(step_fn, state, batches)
    return loss0, grads, metrics['loss'], state.params, state.model_state

  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  with jax.set_mesh(mesh):
    out = run(jax.device_put(state, state_lib.state_shardings(state, mesh)),
              jax.device_put(stacked, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))))
  return jax.tree.map(np.asarray, jax.device_get(out))


def assert_meshes_match_one_device(rng, family, meshes, **mesh_overrides):
  """Loss, gradients, 3 steps' losses, final params and router biases of the family's
  config on each (data, fsdp, expert) mesh (with `mesh_overrides`) equal the one-device
  run."""
  cfg = equivalence_config(family, 1, 1)
  graphdef, state = initial_state(cfg)
  batches = random_batches(rng, cfg, 3)
  ref = run_steps(cfg, graphdef, state, batches)
  for data, fsdp, expert in meshes:
    mesh_cfg = equivalence_config(family, data, expert, fsdp)
    for key, value in mesh_overrides.items():
      config_lib.set_key(mesh_cfg, key, value)
    got = run_steps(mesh_cfg, graphdef, state, batches)
    where = f'{family} {mesh_overrides or ""} on mesh ({data}, {fsdp}, {expert})'
    close = lambda rtol, atol: lambda a, b: np.testing.assert_allclose(
        a, b, rtol=rtol, atol=atol, err_msg=where)
    close(1e-5, 0)(got[0], ref[0])  # loss
    close(1e-5, 0)(got[2], ref[2])  # losses of the 3 steps
    jax.tree.map(close(1e-4, 1e-6), got[1], ref[1])  # gradients
    jax.tree.map(close(1e-4, 1e-5), got[3], ref[3])  # params after the steps
    jax.tree.map(close(0, 1e-6), got[4], ref[4])  # router biases


@pytest.mark.parametrize('family', list(FAMILIES))
def test_meshes_match_single_device(family, rng):
  assert_meshes_match_one_device(rng, family, MESHES[1:])


@pytest.mark.newest_jax
@pytest.mark.parametrize('family', ['gshard', 'mixtral'])  # capacity router; dropless
def test_fsdp_meshes_match_single_device(family, rng):
  """Weights and optimizer moments split over fsdp (experts over expert x fsdp) give the
  one-device loss, gradients and parameters after 3 steps."""
  assert_meshes_match_one_device(rng, family, FSDP_MESHES)


def layer_inputs(rng, t, d, f, e):
  return (rng.standard_normal((t, d)).astype(np.float32),
          rng.standard_normal((d, e)).astype(np.float32),
          (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32),
          (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32),
          (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32))


@pytest.mark.parametrize('router,scope', [('token_choice', 'micro_batch'),
                                          ('token_choice', 'global'),
                                          ('token_choice', 'sequence'),
                                          ('expert_choice', 'micro_batch')])
@pytest.mark.parametrize('data,expert', [(2, 4), (1, 8), (2, 2)])
def test_capacity_is_per_device_group(router, scope, data, expert, rng):
  """With drops, the sharded layer equals the single-device layer run on each device's
  tokens separately (the documented per-group capacity rule)."""
  t, d, f, e, seq = 128, 8, 16, 8, 4
  x, r, wg, wu, wd = layer_inputs(rng, t, d, f, e)
  spec = moe_lib.MoESpec(e, 2, router, 'softmax', 'softmax_topk', False, 1.0, 0.75, 0.75,
                         'position', False, 'padded', 0.0, scope)
  mesh = jax.make_mesh((data, 1, expert), mesh_lib.AXES,
                       devices=jax.devices()[:data * expert],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def layer(x, r, wg, wu, wd):
    return moe_parallel.run_moe_ffn(x, r, wg, wu, wd, None, jax.random.key(0), spec=spec,
                                    seq_len=seq, train=True, dtype=jnp.float32)

  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
    y, stats = jax.jit(layer)(xs, r, wg, wu, wd)
  groups = data * expert
  size = t // groups
  parts = [moe_lib.moe_ffn(x[i * size:(i + 1) * size], r, wg, wu, wd, None,
                           jax.random.key(0), spec=spec, seq_len=seq, train=True,
                           dtype=jnp.float32) for i in range(groups)]
  # Outputs are O(1) sums of the K experts' terms: float32 rounds them to ~1e-6 absolute,
  # so an output that cancels to ~1e-4 needs atol above that (a drop rule off by one token
  # moves outputs by O(0.1)).
  np.testing.assert_allclose(np.asarray(y), np.concatenate([np.asarray(p[0]) for p in parts]),
                             rtol=1e-5, atol=1e-5)
  if router == 'token_choice':
    assert float(stats['dropped_frac']) > 0
  dropped = np.mean([float(p[1]['dropped_frac']) for p in parts])
  np.testing.assert_allclose(float(stats['dropped_frac']), dropped, rtol=1e-5)
  if scope == 'global':
    whole = moe_lib.moe_ffn(x, r, wg, wu, wd, None, jax.random.key(0), spec=spec,
                            seq_len=seq, train=True, dtype=jnp.float32)[1]
    expected = float(whole['balance_loss'])
  else:
    expected = np.mean([float(p[1]['balance_loss']) for p in parts])
  np.testing.assert_allclose(float(stats['balance_loss']), expected, rtol=1e-5)


def compiled_train_step_hlo(rng, data, expert):
  cfg = equivalence_config('gshard', data, expert)
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:data * expert])
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, state, shardings = state_lib.init_state(cfg, mesh, tx)
  batch = jax.device_put(random_batches(rng, cfg, 1)[0], mesh_lib.batch_sharding(mesh))
  step_fn = jax.jit(step_lib.make_train_step(graphdef, tx, cfg), out_shardings=(shardings, None))
  with jax.set_mesh(mesh):
    return step_fn.lower(state, batch).compile().as_text(), cfg


def test_train_step_uses_all_to_all_and_never_gathers_expert_weights(rng):
  hlo, cfg = compiled_train_step_hlo(rng, 2, 4)
  assert 'all-to-all' in hlo
  m = cfg.model
  full_expert_shapes = {f'[{m.num_experts},{m.d_model},{m.d_ff}]',
                        f'[{m.num_experts},{m.d_ff},{m.d_model}]'}
  gathers = [line for line in hlo.splitlines() if re.search(r'\ball-gather(-start)?\(', line)]
  for line in gathers:
    assert not any(shape in line for shape in full_expert_shapes), line
  local = f'[{m.num_experts // 4},{m.d_model},{m.d_ff}]'
  assert local in hlo  # experts are stored and computed sharded, 2 of 8 per device.


@pytest.mark.parametrize('overrides,message', [
    ({'model.num_experts': 6, 'mesh.expert': 4, 'mesh.data': 2}, 'not divisible by mesh.expert'),
    ({'data.batch_size': 6, 'mesh.expert': 4, 'mesh.data': 2}, 'data.batch_size=6'),
    ({'mesh.expert': 4, 'mesh.data': 4}, '8 are present'),
    ({'mesh.expert': 3, 'mesh.data': -1}, 'does not divide the 8 devices'),
    ({'mesh.fsdp': -1, 'mesh.data': -1}, 'only one of mesh.data, mesh.fsdp and mesh.expert'),
    ({'model.num_experts': 0, 'mesh.expert': 2}, 'needs a MoE model'),
])
def test_mesh_errors_name_the_key(overrides, message):
  cfg = tiny_config(**overrides)
  with pytest.raises(ConfigError, match=message):
    train.prepare(cfg)


def test_fill_axis_takes_the_remaining_devices():
  cfg = tiny_config(**{'mesh.data': -1, 'mesh.expert': 2})
  assert mesh_lib.mesh_shape(cfg.mesh, 8) == (4, 1, 2)
  assert mesh_lib.make_mesh(cfg).shape == {'data': 4, 'fsdp': 1, 'expert': 2}
  cfg = tiny_config(**{'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.expert': 2})
  assert mesh_lib.mesh_shape(cfg.mesh, 8) == (1, 4, 2)


@pytest.mark.newest_jax
def test_fsdp_step_stores_one_eighth_and_gathers_just_in_time():
  """With fsdp=8 each device's compiled-step arguments (state and batch) are at most
  1.15 x the whole state / 8, and the program all-gathers weights and reduce-scatters
  expert gradients instead of holding replicated copies."""
  from moetrain import compile as compile_lib
  cfg = equivalence_config('gshard', 1, 1, fsdp=8)
  cfg.model.vocab_size = 0  # the tokenizer's (384): real data could feed this step.
  report, compiled = compile_lib.compile_step(cfg)
  prepared = compile_lib.prepare(cfg, 8, 'cpu')
  total = compile_lib.state_bytes(prepared, mesh_lib.make_mesh(prepared))
  assert report.argument_bytes <= 1.15 * total / 8, (report.argument_bytes, total)
  assert report.collectives['all-gather'] > 0 and report.collectives['reduce-scatter'] > 0
  m = prepared.model
  hlo = compiled.as_text()
  entry = hlo[hlo.index('\nENTRY'):].split('\n}\n')[0]  # the step's own arguments
  local = [l for l in entry.splitlines() if 'parameter(' in l]
  assert any(f'[{m.num_experts},{m.d_model // 8},{m.d_ff}]' in l for l in local)
  for shape in (f'[{m.num_experts},{m.d_model},{m.d_ff}]', f'[{m.vocab_size},{m.d_model}]'):
    assert not [l for l in local if shape in l], shape  # no argument holds a whole weight


def test_d_model_must_split_over_fsdp():
  cfg = tiny_config(**{'mesh.data': 1, 'mesh.fsdp': 8, 'model.d_model': 36,
                       'model.num_heads': 2})
  with pytest.raises(ConfigError, match=r'model\.d_model=36 is not divisible by mesh\.fsdp=8'):
    train.prepare(cfg)


def test_dropless_under_expert_parallelism_says_padded_once(caplog, rng):
  t, d, f, e = 32, 8, 16, 8
  spec = moe_lib.MoESpec(e, 2, 'token_choice', 'softmax', 'topk_softmax', False, 1.0, 1.0,
                         1.0, 'position', True, 'auto', 0.0, 'micro_batch')
  mesh = jax.make_mesh((1, 1, 2), mesh_lib.AXES, devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  moe_parallel.log_dropless_choice.cache_clear()
  layer = lambda *a: moe_parallel.run_moe_ffn(*a, None, jax.random.key(0), spec=spec,
                                              seq_len=4, train=True, dtype=jnp.float32)
  with jax.set_mesh(mesh):
    for _ in range(2):
      jax.eval_shape(layer, *layer_inputs(rng, t, d, f, e))
  messages = [r.getMessage() for r in caplog.records if 'dropless' in r.getMessage()]
  assert len(messages) == 1 and 'padded all-to-all' in messages[0]
