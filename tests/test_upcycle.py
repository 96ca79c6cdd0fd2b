"""Warm starts and sparse upcycling: a MoE upcycled from a trained dense run computes the
dense model's logits at step 0 and starts training at the dense model's loss."""

import jax
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import objective
from moetrain import optimizer as optimizer_lib
from moetrain import resume
from moetrain import train
from moetrain.interop import params as params_lib
from moetrain.interop import upcycle
from moetrain.parallel import mesh as mesh_lib

from conftest import model_logits, tiny_config


def test_upcycle_params_copies_the_dense_ffn_into_every_expert(rng):
  source = {'embed': rng.standard_normal((8, 4)),
            'blocks.0.ffn.w_gate': rng.standard_normal((4, 6)),
            'blocks.0.ffn.w_down': rng.standard_normal((6, 4))}
  fresh = {'embed': np.zeros((8, 4), np.float32),
           'blocks.0.ffn.router': rng.standard_normal((4, 3)).astype(np.float32),
           'blocks.0.ffn.w_gate': np.zeros((3, 4, 6), np.float32),
           'blocks.0.ffn.w_down': np.zeros((3, 6, 4), np.float32)}
  out = upcycle.upcycle_params(source, fresh, source='dense')
  assert set(out) == set(fresh) and all(v.dtype == np.float32 for v in out.values())
  np.testing.assert_array_equal(out['embed'], source['embed'].astype(np.float32))
  np.testing.assert_array_equal(out['blocks.0.ffn.router'], fresh['blocks.0.ffn.router'])
  for e in range(3):
    np.testing.assert_array_equal(out['blocks.0.ffn.w_gate'][e],
                                  source['blocks.0.ffn.w_gate'].astype(np.float32))
    np.testing.assert_array_equal(out['blocks.0.ffn.w_down'][e],
                                  source['blocks.0.ffn.w_down'].astype(np.float32))
  bad = dict(fresh, embed=np.zeros((8, 5), np.float32))
  with pytest.raises(config_lib.ConfigError, match=r'builds embed as 8x5, but the source has '
                     r'8x4;') as info:
    upcycle.upcycle_params(source, bad, source='dense')
  assert '\n' not in str(info.value)
  with pytest.raises(config_lib.ConfigError, match=r'parameter embed is 8x4 there but this '
                     r'config builds 8x5;'):
    upcycle.warm_start_params(source, dict(source, embed=np.zeros((8, 5))), source='dense')


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  """A dense tiny model trained for a few steps: its loss is well below a fresh model's."""
  workdir = tmp_path_factory.mktemp('dense')
  cfg = tiny_config(**{'model.num_experts': 0, 'train.steps': 8,
                                     'train.lr': 1e-2, 'train.eval_every': 8})
  train.train(cfg, workdir, log=lambda *a: None)
  return workdir, params_lib.newest_params(workdir)[1]


def moe_config(dense_dir, **overrides):
  return tiny_config(**{
      'model.moe.renormalize': True, 'model.moe.dropless': True, 'init.from_workdir':
      str(dense_dir), 'init.upcycle': True, 'train.steps': 2, 'train.warmup_steps': 1,
      'train.log_every': 1, 'train.eval_every': 2, **overrides})


def initial_params(cfg):
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  _, state, _ = resume.init_from_run(cfg, mesh, optimizer_lib.make_optimizer(cfg.train),
                                     log=lambda *a: None)
  return cfg, params_lib.to_flat(state.params)


@pytest.mark.parametrize('order,scan', [('softmax_topk', False), ('topk_softmax', True)])
def test_upcycled_moe_computes_the_dense_model(dense_run, order, scan, rng):
  dense_dir, dense = dense_run
  cfg, moe = initial_params(moe_config(dense_dir, **{'model.moe.softmax_order': order,
                                                     'model.scan_layers': scan}))
  assert moe['blocks.1.ffn.w_gate'].shape == (4,) + dense['blocks.1.ffn.w_gate'].shape
  dense_cfg = params_lib.run_config(dense_dir)
  tokens = rng.integers(0, cfg.model.vocab_size, (2, 24))
  np.testing.assert_allclose(model_logits(cfg, moe, tokens),
                             model_logits(dense_cfg, dense, tokens), rtol=0, atol=1e-5)


def test_warm_start_copies_every_parameter(dense_run):
  dense_dir, dense = dense_run
  cfg = tiny_config(**{'model.num_experts': 0, 'init.from_workdir':
                                     str(dense_dir)})
  _, warm = initial_params(cfg)
  cfg.model.scan_layers = True  # the blocks stacked into one scanned run: the same weights.
  _, scanned = initial_params(cfg)
  assert set(warm) == set(scanned) == set(dense)
  for key in dense:
    np.testing.assert_array_equal(warm[key], dense[key])
    np.testing.assert_array_equal(scanned[key], dense[key])
  with pytest.raises(config_lib.ConfigError, match=r'parameter blocks\.0\.attn\.w_k is 32x2x8 '
                     'there but this config builds 48x2x12;'):
    initial_params(tiny_config(**{'model.num_experts': 0, 'model.d_model': 48,
                                  'init.from_workdir': str(dense_dir)}))


def test_training_from_the_upcycled_moe_starts_at_the_dense_loss(dense_run, tmp_path):
  dense_dir, dense = dense_run
  cfg = moe_config(dense_dir)
  summary = train.train(cfg, tmp_path, log=lambda *a: None)
  assert summary.steps == 2
  first = next(r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if 'ce' in r)
  assert first['step'] == 1
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  data = data_lib.make_data(cfg)
  batch = next(data.train)  # the batch of step 1
  data.train.close()
  logits = model_logits(params_lib.run_config(dense_dir), dense, batch['inputs'])
  dense_ce = float(objective.cross_entropy(logits, batch['targets'], batch['mask']))
  assert abs(first['ce'] - dense_ce) < 1e-4
  assert dense_ce < np.log(cfg.model.vocab_size) - 1.0  # far below a fresh model's ~ln V.
