"""The training loop: router and experts learn jointly; each model variant trains."""

import jax
import numpy as np
import pytest

from moetrain import accumulate
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain import train
from moetrain.parallel import mesh as mesh_lib

from conftest import seed_of, tiny_config

ONE_DEVICE = {'mesh.data': 1, 'mesh.expert': 1}


def setup(cfg):
  """(cfg, graphdef, state, optimizer) on one device."""
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(cfg.train)
  graphdef, state, _ = state_lib.init_state(cfg, mesh, tx)
  return cfg, graphdef, state, tx


def random_batch(rng, cfg, vocab=200):
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  tokens = rng.integers(0, vocab, (shape[0], shape[1] + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.ones(shape, np.float32))


def run_steps(cfg, graphdef, state, tx, batch, steps):
  """`steps` train steps on the same batch in one jitted scan: (state, metrics per step)."""
  step_fn = step_lib.make_train_step(graphdef, tx, cfg)
  scan = jax.jit(lambda s, b: jax.lax.scan(lambda s, _: step_fn(s, b), s, length=steps))
  return scan(state, batch)


@pytest.mark.parametrize('name,overrides', [
    ('dense', {'model.num_experts': 0}),
    ('switch', {'model.moe.top_k': 1}),
    ('shared_experts', {'model.moe.num_shared_experts': 1}),
    ('fine_grained', {'model.num_experts': 8, 'model.moe.d_expert': 16,
                      'model.moe.top_k': 4}),
    ('first_k_dense', {'model.num_layers': 3, 'model.first_k_dense': 1}),
    ('sigmoid_bias', {'model.moe.gate': 'sigmoid', 'model.moe.bias_update_rate': 0.01,
                      'model.moe.renormalize': True, 'model.moe.balance_coef': 0.0}),
    ('expert_choice', {'model.moe.router': 'expert_choice'}),
])
def test_variant_trains(name, overrides, rng):
  """Eight steps on one batch: the loss falls (the model fits it) and stays finite."""
  cfg, graphdef, state, tx = setup(tiny_config(**{**ONE_DEVICE, 'train.lr': 1e-2,
                                                  'train.steps': 8, **overrides}))
  state, metrics = run_steps(cfg, graphdef, state, tx, random_batch(rng, cfg), 8)
  loss = np.asarray(metrics['loss'])
  assert np.all(np.isfinite(loss)), name
  assert loss[-1] < loss[0] - 0.3, (name, loss)
  assert int(state.step) == 8
  if name == 'sigmoid_bias':
    assert np.asarray(metrics['moe/layer0/bias_norm']).max() > 0  # the bias moved.


def test_tokamax_grouped_matmuls_train_like_padded_buffers(rng):
  """Dropless with model.moe.grouped_matmul='tokamax' (dropless_impl 'auto' then takes the
  grouped matmuls): three steps give the losses of padded expert buffers."""
  batch, losses = None, []
  for overrides in ({'model.moe.grouped_matmul': 'tokamax'},
                    {'model.moe.dropless_impl': 'padded'}):
    cfg, graphdef, state, tx = setup(tiny_config(**{**ONE_DEVICE, 'model.moe.dropless': True,
                                                    **overrides}))
    batch = batch or random_batch(rng, cfg)
    losses.append(np.asarray(run_steps(cfg, graphdef, state, tx, batch, 3)[1]['loss']))
  assert np.all(np.isfinite(losses[0]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.parametrize('top_k', [1, 2])
def test_router_gradient_is_nonzero_and_matches_finite_difference(top_k, rng):
  """d loss / d router kernel (cross-entropy through the combine weights plus both aux
  losses) against central differences along the gradient direction, whose directional
  derivative is |grad|. The router kernel is drawn large (std 0.3) and the batch small (32
  tokens) so logit gaps are wide. Top-k is discontinuous where a token's choice flips; a
  draw where that happens inside the difference steps shows as differences that disagree
  with each other, and is redrawn (a few times at most)."""
  cfg, graphdef, state, _ = setup(tiny_config(**{
      **ONE_DEVICE, 'model.num_layers': 1, 'model.moe.top_k': top_k,
      'model.moe.capacity_factor': 4.0, 'data.batch_size': 2, 'data.seq_len': 16}))
  loss_fn = step_lib.make_loss_fn(graphdef, cfg)

  def loss_at(kernel_DE, batch):
    params = jax.tree.map(lambda x: x, state.params)
    params['blocks'][0]['ffn']['router'][...] = kernel_DE
    return loss_fn(params, state.model_state, batch, jax.random.key(0))[0]

  grad_fn, loss = jax.jit(jax.grad(loss_at)), jax.jit(loss_at)
  shape = state.params['blocks'][0]['ffn']['router'][...].shape
  for _ in range(5):
    batch = random_batch(rng, cfg)
    kernel_DE = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    grad_DE = np.asarray(grad_fn(kernel_DE, batch))
    norm = np.linalg.norm(grad_DE)
    assert norm > 1e-3
    direction_DE = grad_DE / norm
    numeric = np.array([(float(loss(kernel_DE + eps * direction_DE, batch)) -
                         float(loss(kernel_DE - eps * direction_DE, batch))) / (2 * eps)
                        for eps in (1e-3, 2e-3, 3e-3, 4e-3)])
    if np.ptp(numeric) < 0.04 * norm:  # smooth here: no choice flipped.
      np.testing.assert_allclose(np.median(numeric), norm, rtol=0.03)
      return
  pytest.fail(f'every draw had a routing flip inside the difference steps: {numeric}')


def test_train_end_to_end_writes_logs_and_checkpoint(tmp_path):
  cfg = tiny_config(**{'mesh.data': 2, 'mesh.expert': 4, 'train.steps': 12, 'train.log_every': 1,
                       'train.eval_every': 6, 'train.lr': 1e-2})
  summary = train.train(cfg, tmp_path, log=lambda *_: None)
  records = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == list(range(1, 13))
  assert steps[-1]['loss'] < steps[0]['loss']
  for key in ('ce', 'balance_loss', 'z_loss', 'lr', 'grad_norm', 'tokens_per_second',
              'moe/layer0/dropped_frac', 'moe/layer0/load_max_over_mean',
              'moe/layer1/router_entropy'):
    assert key in steps[-1], key
  assert len(steps[-1]['moe/layer0/load']) == cfg.model.num_experts
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert summary.eval_loss == pytest.approx(evals[-1]['eval/loss'])
  # Byte tokenizer: every target but the end-of-document token (0 bytes) is one byte.
  assert evals[-1]['eval/bits_per_byte'] >= evals[-1]['eval/loss'] / np.log(2)
  assert summary.eval_bits_per_byte == pytest.approx(evals[-1]['eval/bits_per_byte'])
  assert summary.lines()[0].endswith(f"{evals[-1]['eval/bits_per_byte']:.4f} bits/byte")
  assert summary.eval_unigram_entropy > 0
  assert list((tmp_path / 'tb').iterdir())
  assert (tmp_path / 'checkpoints' / '12').is_dir()
  assert (tmp_path / 'config.json').is_file()
  # The same command again: nothing to train, and the finished run's numbers, not NaN.
  lines = []
  again = train.train(cfg, tmp_path, log=lines.append)
  assert any('nothing to train' in line for line in lines)
  assert (again.steps, again.first_step) == (12, 12)
  assert again.eval_loss == pytest.approx(summary.eval_loss, rel=1e-5)
  assert again.final_loss == pytest.approx(summary.final_loss)
  assert 'no step trained in this call' in lines[-1]
  assert summary.lines()[-1].startswith('12 steps in ')


@pytest.fixture(scope='module')
def accumulation_runs():
  """One train step of a no-drop, sequence-balanced model from the same state on the
  same batch (a loss mask with holes, so micro-batches differ in token count), with the
  batch whole and as micro-batches, on one device and on a (2 data x 2 fsdp) mesh."""
  rng = np.random.default_rng(seed_of('accumulation_runs'))
  base = {'model.num_layers': 2, 'model.moe.capacity_factor': 8.0,
          'model.moe.balance_scope': 'sequence', 'model.moe.bias_update_rate': 0.01,
          'data.batch_size': 16, 'data.seq_len': 8}
  cfg0 = data_lib.resolve_vocab(config_lib.validate(tiny_config(**{**base, **ONE_DEVICE})))
  batch = random_batch(rng, cfg0)
  batch['mask'] = (rng.random(batch['mask'].shape) < 0.7).astype(np.float32)
  _, graphdef, state, tx = setup(tiny_config(**{**base, **ONE_DEVICE}))
  out = {}
  meshes = {1: ONE_DEVICE, 4: {'mesh.data': 2, 'mesh.fsdp': 2}}
  for devices, micro in ((1, 1), (1, 2), (4, 1), (4, 4)):
    cfg = data_lib.resolve_vocab(config_lib.validate(tiny_config(**{
        **base, **meshes[devices], 'train.grad_accum_steps': micro})))
    mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:devices])
    shardings = state_lib.state_shardings(state, mesh)
    with jax.set_mesh(mesh):
      new, metrics = jax.jit(step_lib.make_train_step(graphdef, tx, cfg))(
          jax.device_put(state, shardings),
          jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
    out[devices, micro] = jax.device_get((new, metrics))
  return out


@pytest.mark.parametrize('devices,micro', [(1, 2), (4, 4)])
def test_gradient_accumulation_gives_the_whole_batch_update(accumulation_runs, devices,
                                                            micro):
  (want_state, want), (got_state, got) = (accumulation_runs[devices, 1],
                                          accumulation_runs[devices, micro])
  assert want.keys() == got.keys() and 'moe/layer1/load' in got
  for key in want:  # loss, ce, aux losses, grad norm and every routing metric
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_state, want_state)


def test_gradient_accumulation_matches_across_meshes(accumulation_runs):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               accumulation_runs[4, 4][0], accumulation_runs[1, 1][0])


def test_micro_batches_must_divide_the_batch():
  cfg = tiny_config(**{'data.batch_size': 8, 'train.grad_accum_steps': 4})
  with pytest.raises(config_lib.ConfigError, match=r'data\.batch_size=8 is not divisible '
                     r'by the 8 devices .* x train\.grad_accum_steps=4 micro-batches; choose '
                     r'a multiple of 32'):
    train.prepare(cfg)


def test_micro_batch_i_takes_every_nth_row():
  batch = {'inputs': np.arange(8 * 3).reshape(8, 3)}
  micro = np.asarray(accumulate.micro_batches(batch, 4)['inputs'])
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1], batch['inputs'][[1, 5]])
