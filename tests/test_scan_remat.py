"""The decoder: scanned layers (runs of first_k_dense / moe_every stacks) compute what the
unscanned model computes, and every remat policy leaves loss and gradients unchanged."""

import re

import jax
import numpy as np
import pytest

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain.model import transformer
from moetrain.parallel import mesh as mesh_lib

from conftest import seed_of, tiny_config

# 6 layers: dense, then (dense, MoE) twice, then a dense tail -> three runs.
MIXED = {'model.vocab_size': 128, 'model.d_model': 16, 'model.num_heads': 2,
         'model.num_kv_heads': 1, 'model.d_ff': 32, 'model.num_layers': 6,
         'model.first_k_dense': 1, 'model.moe_every': 2, 'model.moe.capacity_factor': 8.0,
         'model.moe.bias_update_rate': 0.01, 'data.seq_len': 8, 'data.batch_size': 4,
         'mesh.data': 1, 'mesh.expert': 1}


def mixed_config(**overrides):
  return config_lib.validate(tiny_config(**{**MIXED, **overrides}))


def random_batch(rng, cfg):
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  return dict(inputs=rng.integers(0, 100, shape).astype(np.int32),
              targets=rng.integers(0, 100, shape).astype(np.int32),
              mask=(rng.random(shape) < 0.9).astype(np.float32))


def abstract_state(cfg):
  """(graphdef, abstract TrainState, optimizer) without computing anything."""
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, abstract, _ = state_lib.abstract_state(cfg, mesh, tx)
  return graphdef, abstract, tx


def make_state(cfg):
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, state, _ = state_lib.init_state(cfg, mesh, tx)
  return graphdef, state, tx


def unscanned_layout(cfg, flat: dict) -> dict:
  """A scanned model's flat {path: array} in the unscanned layout ('blocks.<layer>.')."""
  out = {}
  for key, value in flat.items():
    found = re.match(r'(.*)runs\.(\d+)\.units\.(\d+)\.(.*)', key)
    if not found:
      out[key] = value
      continue
    prefix, r, j, rest = found.groups()
    run = transformer.layer_runs(cfg.model)[int(r)]
    for k, layer in enumerate(run.layers()[int(j)::len(run.unit)]):
      out[f'{prefix}blocks.{layer}.{rest}'] = value[k]
  return out


@pytest.mark.parametrize('layers,first_k_dense,moe_every,experts,expected', [
    (6, 1, 2, 4, [(0, (False,), 1), (1, (False, True), 2), (5, (False,), 1)]),
    (4, 0, 1, 4, [(0, (True,), 4)]),
    (5, 2, 1, 4, [(0, (False,), 2), (2, (True,), 3)]),
    (3, 0, 1, 0, [(0, (False,), 3)]),
    (7, 0, 3, 4, [(0, (False, False, True), 2), (6, (False,), 1)]),
])
def test_layer_runs_follow_first_k_dense_and_moe_every(layers, first_k_dense, moe_every,
                                                       experts, expected):
  m = tiny_config(**{'model.num_layers': layers, 'model.first_k_dense': first_k_dense,
                     'model.moe_every': moe_every, 'model.num_experts': experts}).model
  runs = transformer.layer_runs(m)
  assert [(r.start, r.unit, r.repeats) for r in runs] == expected
  pattern = [moe for r in runs for moe in r.unit * r.repeats]
  assert [i for i, moe in enumerate(pattern) if moe] == config_lib.moe_layers(m)


@pytest.fixture(scope='module')
def scan_pair():
  """The same mixed model unscanned and scanned (remat 'full' inside the scan): its
  initial state, and the loss, gradients, state and metrics of one train step from it
  on the same batch (one jit each)."""
  rng = np.random.default_rng(seed_of('scan_pair'))
  out = {}
  batch = random_batch(rng, mixed_config())
  for scanned in (False, True):
    cfg = mixed_config(**{'model.scan_layers': scanned,
                          'model.remat': 'full' if scanned else 'none'})
    graphdef, state, tx = make_state(cfg)
    step = step_lib.make_train_step(graphdef, tx, cfg)
    grad_fn = jax.value_and_grad(step_lib.make_loss_fn(graphdef, cfg), has_aux=True)

    @jax.jit
    def run(state, batch):
      (loss, _), grads = grad_fn(state.params, state.model_state, batch, jax.random.key(0))
      return loss, grads, *step(state, batch)

    loss, grads, new_state, metrics = run(state, batch)
    out[scanned] = dict(cfg=cfg, state=state, loss=loss, grads=grads, new_state=new_state,
                        metrics=jax.device_get(metrics))
  return out


def test_scanned_model_initializes_like_unscanned(scan_pair):
  plain = checkpoint_lib.flatten(scan_pair[False]['state'])
  scanned = checkpoint_lib.flatten(scan_pair[True]['state'])
  assert any('.runs.1.units.1.ffn.w_gate' in k for k in scanned)  # stacked MoE weights
  w = [v for k, v in scanned.items() if k.endswith('params.runs.1.units.1.ffn.w_gate.value')][0]
  assert w.shape == (2, 4, 16, 32)  # [repeats, E, D, F]
  converted = unscanned_layout(scan_pair[True]['cfg'], scanned)
  assert converted.keys() == plain.keys()
  for key in plain:
    np.testing.assert_array_equal(np.asarray(converted[key]), np.asarray(plain[key]), key)


@pytest.mark.newest_jax
def test_scanned_model_gives_the_same_loss_gradients_and_step(scan_pair):
  plain, scanned = scan_pair[False], scan_pair[True]
  np.testing.assert_allclose(float(scanned['loss']), float(plain['loss']), rtol=1e-6)
  grads = unscanned_layout(scanned['cfg'], checkpoint_lib.flatten(scanned['grads']))
  want = checkpoint_lib.flatten(plain['grads'])
  for key in want:
    np.testing.assert_allclose(np.asarray(grads[key]), np.asarray(want[key]), rtol=2e-5,
                               atol=1e-7, err_msg=key)
  after = unscanned_layout(scanned['cfg'], checkpoint_lib.flatten(scanned['new_state']))
  for key, value in checkpoint_lib.flatten(plain['new_state']).items():
    np.testing.assert_allclose(np.asarray(after[key]), np.asarray(value), rtol=1e-5,
                               atol=1e-6, err_msg=key)  # router biases moved per layer too


@pytest.mark.newest_jax
def test_scanned_model_reports_metrics_per_moe_layer(scan_pair):
  plain, scanned = scan_pair[False]['metrics'], scan_pair[True]['metrics']
  assert {k.split('/')[1] for k in scanned if k.startswith('moe/')} == {'layer2', 'layer4'}
  assert plain.keys() == scanned.keys()
  for key in plain:
    np.testing.assert_allclose(scanned[key], plain[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert scanned['moe/layer2/load'].tolist() != scanned['moe/layer4/load'].tolist()


@pytest.mark.newest_jax
def test_program_size_does_not_grow_with_depth_when_scanned(rng):
  """The traced train step of a scanned model has one layer per run whatever the depth;
  unscanned it grows with every layer."""
  def equations(layers, scanned):
    cfg = mixed_config(**{'model.num_layers': layers, 'model.first_k_dense': 0,
                          'model.moe_every': 1, 'model.scan_layers': scanned})
    graphdef, state, tx = abstract_state(cfg)
    jaxpr = jax.make_jaxpr(step_lib.make_train_step(graphdef, tx, cfg))(
        state, random_batch(rng, cfg))
    return str(jaxpr).count('dot_general')

  assert equations(8, True) == equations(2, True)
  assert equations(8, False) > 3 * equations(2, False)


@pytest.fixture(scope='module')
def remat_runs():
  """Loss, gradients and the traced gradient program of the mixed model under each
  policy, from one initial state."""
  rng = np.random.default_rng(seed_of('remat_runs'))
  batch = random_batch(rng, mixed_config())
  _, state, _ = make_state(mixed_config())
  out = {}
  for policy in ('none', *transformer.REMAT_POLICIES):
    cfg = mixed_config(**{'model.remat': policy})
    graphdef = abstract_state(cfg)[0]
    fn = jax.value_and_grad(step_lib.make_loss_fn(graphdef, cfg), has_aux=True)
    args = (state.params, state.model_state, batch, jax.random.key(0))
    (loss, _), grads = jax.jit(fn)(*args)
    out[policy] = dict(loss=float(loss), grads=checkpoint_lib.flatten(grads),
                       jaxpr=str(jax.make_jaxpr(fn)(*args)))
  return out


@pytest.mark.newest_jax
@pytest.mark.parametrize('policy', list(transformer.REMAT_POLICIES))
def test_remat_policy_keeps_loss_and_gradients(remat_runs, policy):
  ref, got = remat_runs['none'], remat_runs[policy]
  np.testing.assert_allclose(got['loss'], ref['loss'], rtol=1e-6)
  for key, value in ref['grads'].items():
    np.testing.assert_allclose(np.asarray(got['grads'][key]), np.asarray(value), rtol=1e-5,
                               atol=1e-7, err_msg=f'{policy}: {key}')


def test_remat_is_applied(remat_runs):
  """Rematerialization is real: the gradient program holds checkpointed blocks, and under
  'full' it runs more matmuls than without (every block's forward again)."""
  for policy in transformer.REMAT_POLICIES:
    assert re.search(r'\b(checkpoint|remat2?)\[', remat_runs[policy]['jaxpr']), policy
  assert not re.search(r'\b(checkpoint|remat2?)\[', remat_runs['none']['jaxpr'])
  dots = {p: r['jaxpr'].count('dot_general') for p, r in remat_runs.items()}
  assert dots['full'] > dots['none'], dots


def test_remat_accepts_old_boolean_configs(tmp_path):
  """Old configs' True / False become 'full' / 'none' where a config comes in: a saved
  config.json, a config file, the command line (`migrate`); validate changes nothing."""
  assert config_lib.migrate(tiny_config(**{'model.remat': 'True'})).model.remat == 'full'
  assert config_lib.migrate(tiny_config(**{'model.remat': 'false'})).model.remat == 'none'
  assert config_lib.from_dict({'model': {'remat': True}}).model.remat == 'full'
  assert config_lib.from_dict({'model': {'remat': False}}).model.remat == 'none'
  path = tmp_path / 'old.py'
  path.write_text('from moetrain.config import default_config\n\n\ndef get_config():\n'
                  '  c = default_config()\n  c.model.remat = "True"\n  return c\n')
  assert config_lib.load(path).model.remat == 'full'
  with pytest.raises(config_lib.ConfigError, match=r"model\.remat='True' is not known"):
    config_lib.validate(tiny_config(**{'model.remat': 'True'}))
  with pytest.raises(config_lib.ConfigError, match=r"model\.remat='most' is not known; use "
                     r'one of none, full, save_dots, minimal'):
    config_lib.validate(tiny_config(**{'model.remat': 'most'}))


def test_resume_across_scan_layers_is_refused_with_the_key():
  cfg = mixed_config()
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(cfg.train)
  saved = {'config': {'model': {'scan_layers': False}},
           'shapes': checkpoint_lib.shapes_of(state_lib.abstract_state(cfg, mesh, tx)[1])}
  scanned = mixed_config(**{'model.scan_layers': True})
  shapes = checkpoint_lib.shapes_of(state_lib.abstract_state(scanned, mesh, tx)[1])
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'saved with model\.scan_layers=False \(config has True\)'):
    checkpoint_lib.check_compatible(saved, {'model': {'scan_layers': True}}, shapes, 3)
