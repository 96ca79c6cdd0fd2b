"""Eval only: a restored run reproduces its training's final eval loss and bits per byte,
the sums match a NumPy cross-entropy of the model's logits, and data, mesh and model
overrides change what they should."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import evaluate as evaluate_lib
from moetrain import metrics as metrics_lib
from moetrain import restore as restore_lib
from moetrain.config import ConfigError


@pytest.fixture(scope='module')
def evaluated(trained_run):
  return evaluate_lib.evaluate_workdir(trained_run)


def np_nats(logits, targets):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  return float(np.sum(logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))


def test_eval_equals_the_training_runs_final_eval(trained_run, evaluated):
  run, totals = evaluated
  assert run.step == 3 and dict(run.mesh.shape) == {'data': 4, 'fsdp': 1, 'expert': 2}
  last = [r for r in metrics_lib.read_jsonl(trained_run / 'metrics.jsonl')
          if 'eval/loss' in r][-1]
  assert last['step'] == 3
  assert totals.loss == pytest.approx(last['eval/loss'], rel=1e-6)
  assert totals.bits_per_byte == pytest.approx(last['eval/bits_per_byte'], rel=1e-6)
  assert totals.tokens == 2 * 8 * 32  # train.eval_batches=2 of 8 x 32.
  assert totals.perplexity == pytest.approx(np.exp(totals.loss))


def test_sums_match_numpy_on_the_eval_batches(evaluated):
  """Reference: the model's logits on each batch (one device), NumPy cross-entropy, and
  the byte tokenizer's bytes: every target that is not the end-of-document token."""
  run, totals = evaluated
  batches = evaluate_lib.eval_batches(run.cfg)
  model = restore_lib.load(run.workdir, {'mesh.data': 1, 'mesh.expert': 1},
                           devices=jax.local_devices()[:1]).model()
  forward = jax.jit(lambda t: model(t, train=False)[0])
  nats = sum(np_nats(np.asarray(forward(b['inputs'])), b['targets']) for b in batches)
  num_bytes = sum(int(np.sum(b['targets'] != run.tokenizer.eod_id)) for b in batches)
  assert totals.bytes == num_bytes
  # Capacity is per device group, so the 8-device eval may drop differently: compare with
  # the one-device eval, which routes the same groups as the reference.
  one = evaluate_lib.evaluate(restore_lib.load(run.workdir, {'mesh.data': 1, 'mesh.expert': 1},
                                               devices=jax.local_devices()[:1]), batches)
  assert one.nats == pytest.approx(nats, rel=1e-5)
  assert one.bits_per_byte == pytest.approx(nats / (np.log(2) * num_bytes), rel=1e-5)


def test_any_mesh_gives_the_same_loss_when_nothing_drops(trained_run):
  no_drops = {'model.moe.eval_capacity_factor': 8.0}
  _, wide = evaluate_lib.evaluate_workdir(trained_run, no_drops)
  _, narrow = evaluate_lib.evaluate_workdir(
      trained_run, {**no_drops, 'mesh.data': 2, 'mesh.expert': 4}, num_batches=2)
  assert narrow.loss == pytest.approx(wide.loss, rel=1e-5)


def test_other_data_and_fewer_batches(trained_run, evaluated, tmp_path):
  _, default = evaluated
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'line {i}: the quick brown fox jumps over the lazy dog ' * 3
                              for i in range(200)))
  overrides = {'data.source': 'files', 'data.paths': str(corpus)}
  run, other = evaluate_lib.evaluate_workdir(trained_run, overrides, num_batches=1)
  assert other.tokens == 8 * 32 and other.loss != pytest.approx(default.loss)
  lines = evaluate_lib.report_lines(run, other)
  assert f'data.source=files {corpus}' in lines[0] and 'bits per byte' in lines[3]
  with pytest.raises(ConfigError, match='--eval_batches=0 must be positive'):
    evaluate_lib.evaluate_workdir(trained_run, num_batches=0)


def test_model_override_and_its_limits(evaluated):
  run, totals = evaluated
  batches = evaluate_lib.eval_batches(run.cfg)
  starved = evaluate_lib.evaluate(
      run, batches, model=run.model({'model.moe.eval_capacity_factor': 0.1}))
  assert starved.loss != pytest.approx(totals.loss) and starved.bytes == totals.bytes
  compiles = evaluate_lib.eval_step.cache_info().misses
  graphdef, params, rest = nnx.split(run.model(), nnx.Param, ...)
  halved = nnx.merge(graphdef, jax.tree.map(lambda w: w / 2, params), rest)  # same structure
  other = evaluate_lib.evaluate(run, batches, model=halved)
  assert other.loss != pytest.approx(totals.loss)
  assert evaluate_lib.eval_step.cache_info().misses == compiles
  with pytest.raises(ConfigError, match='model.d_model change the shapes'):
    run.model({'model.d_model': 64})


def test_each_model_is_its_own(evaluated):
  """Weights set in place in one restored model (as an ablation by hand does) stay there:
  the next model, and its loss, are the checkpoint's."""
  run, totals = evaluated
  edited = run.model()
  w = edited.blocks[0].ffn.w_up
  w[...] = jnp.zeros_like(w[...])
  fresh = run.model()
  assert float(jnp.abs(fresh.blocks[0].ffn.w_up[...]).sum()) > 0
  batches = evaluate_lib.eval_batches(run.cfg)
  assert evaluate_lib.evaluate(run, batches, model=edited).loss != pytest.approx(totals.loss)
  assert evaluate_lib.evaluate(run, batches, model=fresh).loss == pytest.approx(totals.loss,
                                                                               rel=1e-6)


def test_errors_are_one_sentence(trained_run, tmp_path):
  with pytest.raises(ConfigError, match='has no config.json'):
    evaluate_lib.evaluate_workdir(tmp_path)
  (tmp_path / 'config.json').write_text((trained_run / 'config.json').read_text())
  with pytest.raises(ConfigError, match='has no checkpoints yet'):
    evaluate_lib.evaluate_workdir(tmp_path)
  with pytest.raises(ConfigError, match='mesh.expert=3 does not divide'):
    evaluate_lib.evaluate_workdir(trained_run, {'mesh.expert': 3})
  saved = json.loads((trained_run / 'config.json').read_text())
  assert saved['checkpoint']['keep'] == 3
  restore_lib.load(trained_run, {'checkpoint.keep': 1})  # reading never prunes.
  assert sorted(p.name for p in (trained_run / 'checkpoints').iterdir()) == ['2', '3']


def test_reading_a_run_while_it_trains_changes_nothing(trained_run, tmp_path, capsys):
  """A reader takes no lock (a training run holds it), verifies checksums through the
  checkpoint code, falls back past a damaged newest step and leaves it where it is."""
  import shutil
  from moetrain import checkpoint as checkpoint_lib
  from moetrain import cli
  from moetrain import workdir as workdir_lib
  workdir = tmp_path / 'run'
  shutil.copytree(trained_run, workdir)
  holder = workdir_lib.acquire(workdir)
  lock = (workdir / workdir_lib.LOCK).read_text()
  checkpoints = workdir / 'checkpoints'
  shutil.rmtree(checkpoints / '3' / 'state')  # step 2's arrays under step 3's checksums.
  shutil.copytree(checkpoints / '2' / 'state', checkpoints / '3' / 'state')
  with pytest.warns(checkpoint_lib.DamagedCheckpointWarning,
                    match=r'step 3 is damaged \(ChecksumMismatch: .*left it in place and '
                          r'reading from step 2'):
    run = restore_lib.load(workdir, {'mesh.data': 1, 'mesh.expert': 1},
                           devices=jax.local_devices()[:1])
  assert run.step == 2 and int(run.state.step) == 2
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2', '3']
  assert not (workdir / 'checkpoints.damaged').exists()
  assert (workdir / workdir_lib.LOCK).read_text() == lock
  shutil.rmtree(checkpoints / '2' / 'meta')
  with pytest.raises(SystemExit) as e:
    cli.main(['moetrain', 'eval', f'--workdir={workdir}'])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1
  assert err.startswith(f'moetrain: no checkpoint in {checkpoints} can be read (step 3: '
                        'ChecksumMismatch')
  workdir_lib.release(workdir, holder)
