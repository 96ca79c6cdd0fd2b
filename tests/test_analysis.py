"""`moetrain analyze` on a trained tiny run: its files, its expert ablation against experts
zeroed by hand, routes on any mesh, the capacity curve; and specialization where the
answer is known (a planted corpus of two disjoint alphabets)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import data as data_lib
from moetrain import evaluate as evaluate_lib
from moetrain import restore as restore_lib
from moetrain import train
from moetrain.analysis import analyze
from moetrain.analysis import measures
from moetrain.model.transformer import Transformer

from conftest import tiny_config

RNG = np.random.default_rng()


@pytest.fixture(scope='module')
def result(analyzed_run):
  workdir, _ = analyzed_run
  return json.loads((workdir / 'analysis' / 'analysis.json').read_text())


@pytest.fixture(scope='module')
def one_device(trained_run):
  """The trained run restored on one device, and its first eval batch."""
  run = restore_lib.load(trained_run, {'mesh.data': 1, 'mesh.expert': 1, 'train.eval_batches': 1},
                         devices=jax.local_devices()[:1])
  return run, evaluate_lib.eval_batches(run.cfg)


def test_command_writes_json_summary_and_figures(analyzed_run, result):
  workdir, printed = analyzed_run
  files = sorted(p.name for p in (workdir / 'analysis').iterdir())
  assert files == ['ablation.png', 'analysis.json', 'capacity.png', 'specialization_layer0.png',
                   'specialization_layer1.png', 'summary.md']
  summary = (workdir / 'analysis' / 'summary.md').read_text()
  assert summary.strip() in printed
  for section in ('## Specialization', '## Expert ablation', '## Capacity at eval',
                  '## Cross-layer routing'):
    assert section in summary
  assert result['step'] == 3 and result['layers'] == [0, 1] and result['tokens'] == 8 * 32
  for layer in result['specialization']:
    assert set(layer['schemes']) == {'python', 'char class'}
    for s in layer['schemes'].values():
      counts = np.array(s['counts'])
      assert counts.sum() <= 8 * 32 * 2 and s['nmi'] == pytest.approx(measures.nmi(counts))
    assert len(layer['top_tokens']) == 4


def zeroed(model, layer: int, expert: int):
  """`model` with every weight of `expert` in MoE layer `layer` set to 0, by hand."""
  moe = model.blocks[layer].ffn
  for w in (moe.w_gate, moe.w_up, moe.w_down):
    w[...] = w[...].at[expert].set(0.0)
  return model


def test_removing_an_expert_equals_zeroing_its_weights(result, one_device):
  """Acceptance: the analysis's 'without expert e of layer l' loss is the loss of the model
  whose expert has all-zero weights (here on one device, the analysis ran on two), also
  where capacity drops tokens."""
  run, batches = one_device
  layer, expert = int(RNG.integers(2)), int(RNG.integers(4))
  loss = evaluate_lib.evaluate(run, batches, model=zeroed(run.model(), layer, expert)).loss
  assert loss == pytest.approx(result['ablation']['expert_loss'][layer][expert], rel=1e-6)
  assert loss != pytest.approx(result['ablation']['base_loss'], rel=1e-7)
  drops = {'model.moe.eval_capacity_factor': 0.5}
  by_hand = evaluate_lib.evaluate(run, batches, model=zeroed(run.model(drops), layer, expert))
  removed = evaluate_lib.evaluate(run, batches, model=run.model(
      {**drops, 'model.moe.remove_experts': f'{layer}:{expert}'}))
  assert min(removed.dropped) > 0
  assert removed.loss == pytest.approx(by_hand.loss, rel=1e-6)
  assert removed.dropped == pytest.approx(by_hand.dropped)


def test_routes_are_the_same_on_any_mesh(trained_run, one_device):
  run, batches = one_device
  wide = restore_lib.load(trained_run, {'mesh.data': 2, 'mesh.expert': 4})
  np.testing.assert_array_equal(analyze.routes(run.model(), batches, run.mesh),
                                analyze.routes(wide.model(), batches, wide.mesh))


def test_capacity_curve_and_choices(result):
  capacity = {c['capacity_factor']: c for c in result['capacity']}
  assert list(capacity) == ['0.5', '1', '1.25', '2', '4', 'dropless']
  dropped = [np.mean(capacity[k]['dropped']) for k in capacity]
  assert dropped[0] > 0 and all(a >= b for a, b in zip(dropped, dropped[1:]))
  assert capacity['dropless']['dropped'] == [0.0, 0.0]
  assert capacity['2']['loss'] == pytest.approx(result['eval_loss'], rel=1e-6)  # the run's.
  assert capacity['4']['loss'] == pytest.approx(capacity['dropless']['loss'], rel=1e-5)
  assert set(result['ablation']['choices']) == {'without top-1', 'top-1 only'}
  assert len(result['cross_layer']) == 1


def test_dense_run_and_bad_batches_are_one_sentence(trained_run, tmp_path):
  with pytest.raises(Exception, match='--eval_batches=0 must be positive'):
    analyze.analyze(trained_run, num_batches=0)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = subprocess.run([sys.executable, '-m', 'moetrain.cli', 'analyze'], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip() == (
      'moetrain: --workdir is required for analyze; pass --workdir=DIR.')


# ------------------------------------------------------------ planted specialization

FIRST = [chr(c) for c in range(33, 80)]  # two disjoint alphabets of 47 printable bytes.
SECOND = [chr(c) for c in range(80, 127)]


def planted_corpus(path, rng, documents=600):
  """Lines alternating between the alphabets: a random walk of +1..+3 steps over one
  alphabet each (so the next symbol is learnable)."""
  lines = []
  for i in range(documents):
    alphabet = FIRST if i % 2 == 0 else SECOND
    j, symbols = rng.integers(len(alphabet)), []
    for _ in range(rng.integers(30, 70)):
      symbols.append(alphabet[j])
      j = (j + rng.integers(1, 4)) % len(alphabet)
    lines.append(''.join(symbols))
  path.write_text('\n'.join(lines) + '\n')


def alphabet_of(ids_N):
  out = np.full(ids_N.shape, -1)
  out[(ids_N >= 33) & (ids_N < 80)] = 0
  out[(ids_N >= 80) & (ids_N < 127)] = 1
  return out
