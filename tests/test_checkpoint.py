"""Checkpoints that never lose work: exact resume after SIGKILL (also mid-save), SIGTERM /
SIGINT preemption, fallback past damaged checkpoints, safe retention, shape mismatches,
restore onto another mesh, and the non-finite guard."""

import os
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runs import RUN_STEPS, SMALL, final_arrays, losses, run_cli
from conftest import tiny_config
from moetrain import checkpoint as checkpoint_lib
from moetrain import data as data_lib
from moetrain import guard as guard_lib
from moetrain import optimizer as optimizer_lib
from moetrain import preemption
from moetrain import state as state_lib
from moetrain import step as step_lib
from moetrain import metrics as metrics_lib
from moetrain import train as train_lib


def small_config(**overrides):
  return tiny_config(**{**SMALL, **overrides})


# --------------------------------------------------------------------------------------
# Subprocess runs of the CLI (tests/cli_runs.py), killed or signalled at chosen points,
# against conftest's `reference` run.

def assert_same_run(workdir, reference):
  ref_losses, ref_arrays = reference
  assert losses(workdir) == ref_losses
  assert sorted(ref_losses) == list(range(1, RUN_STEPS + 1))
  arrays = final_arrays(workdir, RUN_STEPS)
  assert arrays.keys() == ref_arrays.keys()
  for name in arrays:
    np.testing.assert_array_equal(arrays[name], ref_arrays[name], err_msg=name)


def test_sigkill_at_several_points_and_mid_save_resumes_exactly(tmp_path, reference, cli_env):
  workdir = tmp_path / 'run'
  rc, out = run_cli(cli_env, workdir, signal_after_step=3)  # between saves (step 2 is saved)
  assert rc == -signal.SIGKILL, out
  second = []  # a second run on the workdir while the first is in its save of step 6.
  rc, out = run_cli(cli_env, workdir, slow_finalize_step=6,  # killed during that async save
                    before_signal=lambda: second.append(run_cli(cli_env, workdir)))
  assert rc == -signal.SIGKILL, out
  ckpts = workdir / 'checkpoints'
  assert not (ckpts / '6').exists()
  assert any(p.name.startswith('6.orbax-checkpoint-tmp') for p in ckpts.iterdir())
  (second_rc, second_out), = second
  assert second_rc == 1 and re.fullmatch(
      f'moetrain: {re.escape(str(workdir))} is in use by another moetrain run \\(pid \\d+ on '
      r'host .*\); wait for it to end or choose another --workdir\.\n', second_out), second_out
  rc, out = run_cli(cli_env, workdir, signal_after_step=7)  # right after a resumed step
  assert rc == -signal.SIGKILL, out
  assert 'resuming from the checkpoint at step' in out
  assert 'which is no longer running; taking the lock over.' in out  # the killed run's lock.
  rc, out = run_cli(cli_env, workdir)
  assert rc == 0, out
  assert 'resuming from the checkpoint at step' in out
  assert_same_run(workdir, reference)


def test_sigterm_and_sigint_save_and_exit_zero(tmp_path, reference, cli_env):
  workdir = tmp_path / 'run'
  stopped = None
  for sig, after in ((signal.SIGINT, 1), (signal.SIGTERM, 5)):
    rc, out = run_cli(cli_env, workdir, signal_after_step=after, sig=sig)
    assert rc == 0, out
    assert f'{signal.Signals(sig).name} received' in out
    assert 'no eval loss yet' in out and 'nan' not in out  # stopped before the first eval.
    stopped = int(re.search(r'stopped by a signal at step (\d+)', out).group(1))
    assert after <= stopped < RUN_STEPS
    assert max(checkpoint_lib.Checkpointer(workdir).steps()) == stopped
    assert max(losses(workdir)) == stopped
  rc, out = run_cli(cli_env, workdir)
  assert rc == 0, out
  assert f'resuming from the checkpoint at step {stopped}' in out
  assert_same_run(workdir, reference)


def test_preemption_handler_restores_previous_handlers():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.PreemptionHandler() as stop:
    assert not stop.stop_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.stop_requested()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert {s: signal.getsignal(s) for s in before} == before


# --------------------------------------------------------------------------------------
# Damaged checkpoints, retention, shape mismatches (in-process).

@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('saved') / 'run'
  cfg = small_config(**{'train.steps': 4, 'checkpoint.every_steps': 2})
  train_lib.train(cfg, workdir, log=lambda _: None)
  assert checkpoint_lib.Checkpointer(workdir).steps() == [2, 4]
  return cfg, workdir


def copy_run(saved_run, tmp_path):
  cfg, workdir = saved_run
  dest = tmp_path / 'run'
  shutil.copytree(workdir, dest)
  return cfg.copy_and_resolve_references(), dest


def truncate_state(workdir, step):
  """Cuts every data file of the `state` item of `step` in half."""
  files = [p for p in (workdir / 'checkpoints' / str(step) / 'state').rglob('*')
           if p.is_file() and p.stat().st_size > 64]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def delete_item(workdir, step, item='state'):
  shutil.rmtree(workdir / 'checkpoints' / str(step) / item)


def restore_target(cfg):
  """An abstract TrainState target (and nothing compiled) for Checkpointer.restore_latest."""
  cfg = train_lib.prepare(cfg)
  from moetrain.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(cfg)
  _, abstract, shardings = state_lib.abstract_state(cfg, mesh,
                                                   optimizer_lib.make_optimizer(cfg.train))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def tree(path) -> list[str]:
  return sorted(str(p.relative_to(path)) for p in path.rglob('*'))


@pytest.mark.parametrize('damage', [truncate_state, delete_item,
                                    lambda w, s: delete_item(w, s, 'meta')],
                         ids=['truncated', 'missing-state', 'missing-meta'])
def test_damaged_latest_falls_back_and_is_kept(saved_run, tmp_path, damage):
  cfg, workdir = copy_run(saved_run, tmp_path)
  damage(workdir, 4)
  damaged_files = tree(workdir / 'checkpoints' / '4')
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  with pytest.warns(checkpoint_lib.DamagedCheckpointWarning,
                    match=r'checkpoint at step 4 is damaged \(\w+'):
    step, state, meta = checkpointer.restore_latest(restore_target(cfg))
  assert step == 2 and int(state.step) == 2 and meta['data']['step'] > 0
  assert checkpointer.steps() == [2]
  assert tree(workdir / 'checkpoints.damaged' / '4') == damaged_files


def test_train_resumes_past_damaged_latest_and_keep_1_never_deletes_it(saved_run, tmp_path):
  cfg, workdir = copy_run(saved_run, tmp_path)
  truncate_state(workdir, 4)
  cfg.train.steps, cfg.checkpoint.keep = 6, 1
  logs = []
  with pytest.warns(checkpoint_lib.DamagedCheckpointWarning, match='step 4 is damaged'):
    summary = train_lib.train(cfg, workdir, log=logs.append)
  assert 'resuming from the checkpoint at step 2' in logs
  assert summary.steps == 6
  # keep=1: the newest, and the last good one (step 5 vouched for 4; nothing for 6 yet).
  assert checkpoint_lib.Checkpointer(workdir).steps() == [4, 6]
  assert (workdir / 'checkpoints.damaged' / '4' / 'state').is_dir()
  assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]


def test_retention_keeps_older_steps_while_newest_is_damaged(saved_run, tmp_path):
  _, workdir = copy_run(saved_run, tmp_path)
  truncate_state(workdir, 4)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1)
  with pytest.warns(checkpoint_lib.DamagedCheckpointWarning, match='step 4 does not read back'):
    checkpointer.prune()
  assert checkpointer.steps() == [2, 4]
  _, workdir = copy_run(saved_run, tmp_path / 'intact')
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1)
  assert checkpointer.read_meta(4)['guard']['last_good'] == 2  # step 3 vouched for it.
  checkpointer.prune()
  assert checkpointer.steps() == [2, 4]  # the newest, and the last good one.


def test_no_valid_checkpoint_is_a_clear_error_and_deletes_nothing(saved_run, tmp_path):
  cfg, workdir = copy_run(saved_run, tmp_path)
  truncate_state(workdir, 4)
  delete_item(workdir, 2)
  before = tree(workdir / 'checkpoints')
  cfg.train.steps = 6
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'no checkpoint in .* can be read \(step 4: .*step 2: .*\); move'):
    train_lib.train(cfg, workdir, log=lambda _: None)
  assert tree(workdir / 'checkpoints') == before
  assert not (workdir / 'checkpoints.damaged').exists()


def test_shape_mismatch_names_the_keys_before_compiling(saved_run, tmp_path, monkeypatch):
  cfg, workdir = copy_run(saved_run, tmp_path)
  cfg.model.d_model, cfg.model.num_experts, cfg.train.steps = 32, 8, 6
  compiled = []
  monkeypatch.setattr(step_lib, 'make_train_step', lambda *a: compiled.append(a))
  monkeypatch.setattr(state_lib, 'init_state', lambda *a: compiled.append(a))
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    train_lib.train(cfg, workdir, log=lambda _: None)
  message = str(e.value)
  assert 'model.d_model=16 (config has 32)' in message
  assert 'model.num_experts=4 (config has 8)' in message
  assert 'choose a new --workdir' in message and message.count('. ') == 0
  assert not compiled
  assert checkpoint_lib.Checkpointer(workdir).steps() == [2, 4]


def test_shape_check_names_arrays_when_no_shape_key_differs():
  saved = {'config': {'model': {'d_model': 16}}, 'shapes': {'params.w': [[4, 16], 'float32']}}
  new_shapes = {'params.w': [[4, 8], 'float32']}
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'^the checkpoint at step 7 holds arrays that this config builds '
                           r'differently \(params.w\); use the config'):
    checkpoint_lib.check_compatible(saved, {'model': {'d_model': 16}}, new_shapes, 7)
  checkpoint_lib.check_compatible(saved, {'model': {'d_model': 99}}, saved['shapes'], 7)


# --------------------------------------------------------------------------------------
# Restore onto another mesh.

def resumed_loss(base, workdir, fsdp, expert):
  """Step 3's loss when a copy of `base` (checkpoints at steps 2 and 3) loses its step-3
  checkpoint and resumes from step 2 on a mesh with `fsdp` x `expert` devices on those
  axes (data takes the rest)."""
  shutil.copytree(base, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '3')
  logs = []
  train_lib.train(small_config(**{'train.steps': 3, 'mesh.fsdp': fsdp, 'mesh.expert': expert}),
                  workdir, log=logs.append)
  assert 'resuming from the checkpoint at step 2' in logs
  return losses(workdir)[3]


@pytest.mark.parametrize('saved,resumed', [((1, 4), [(4, 2), (1, 1)]),
                                           ((4, 2), [(1, 4), (1, 1)])])
def test_restore_onto_another_mesh(tmp_path, saved, resumed):
  """(fsdp, expert) meshes: weights split over fsdp 1 -> 4 and 4 -> 1, experts re-split."""
  base = tmp_path / 'base'
  train_lib.train(small_config(**{'train.steps': 3, 'checkpoint.every_steps': 2,
                                  'mesh.fsdp': saved[0], 'mesh.expert': saved[1]}), base,
                  log=lambda _: None)
  expected = losses(base)[3]
  for fsdp, expert in resumed:
    got = resumed_loss(base, tmp_path / f'fsdp{fsdp}_expert{expert}', fsdp, expert)
    np.testing.assert_allclose(got, expected, rtol=2e-6, err_msg=f'fsdp={fsdp} expert={expert}')


# --------------------------------------------------------------------------------------
# Non-finite guard.

def poison_step(monkeypatch, cfg, bad_step):
  """Makes the loss (and so the gradients) NaN on exactly the batch of `bad_step`."""
  rows = data_lib.make_data(train_lib.prepare(cfg.copy_and_resolve_references())).train
  for _ in range(bad_step):
    bad_inputs = next(rows)['inputs']
  make_loss_fn = step_lib.make_loss_fn

  def poisoned(graphdef, cfg):
    loss_fn = make_loss_fn(graphdef, cfg)

    def fn(params, model_state, batch, rng):
      loss, aux = loss_fn(params, model_state, batch, rng)
      poison = jnp.all(batch['inputs'] == bad_inputs)
      return loss * jnp.where(poison, jnp.nan, 1.0), aux

    return fn

  monkeypatch.setattr(step_lib, 'make_loss_fn', poisoned)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
  """Step 3's loss is NaN: checkpoint 2 (whose parameters step 3 used) is not vouched for,
  so the message names step 1, and nothing after step 2 is saved."""
  cfg = small_config(**{'train.steps': 4, 'checkpoint.every_steps': 1})
  poison_step(monkeypatch, cfg, 3)
  with pytest.raises(guard_lib.DivergenceError,
                     match=r'^step 3 has a non-finite loss \(nan\), so training stopped before '
                           r'saving it; the last good checkpoint is step 1: resume from it with '
                           r'--config\.checkpoint\.restore_step=1 and a lower train\.lr'):
    train_lib.train(cfg, tmp_path, log=lambda _: None)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  assert checkpointer.steps() == [1, 2]
  assert all(np.isfinite(a).all() for a in checkpointer.read_arrays(2).values())


def test_skip_nonfinite_skips_only_that_update(tmp_path, monkeypatch):
  cfg = small_config(**{'train.steps': 4, 'checkpoint.every_steps': 1, 'checkpoint.keep': 4,
                        'train.skip_nonfinite': True})
  poison_step(monkeypatch, cfg, 3)
  logs = []
  train_lib.train(cfg, tmp_path, log=logs.append)
  assert any(line.startswith('step 3: a non-finite loss (nan); update skipped (1 of')
             for line in logs), logs
  records = {r['step']: r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
             if 'loss' in r}
  assert [records[s]['nonfinite'] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  a2, a3, a4 = (checkpointer.read_arrays(s) for s in (2, 3, 4))
  for name in a2:
    if name != 'step':
      np.testing.assert_array_equal(a3[name], a2[name], err_msg=name)
  assert int(a3['step']) == 3
  assert any(not np.array_equal(a4[n], a3[n]) for n in a4 if n.startswith('params'))
  assert all(np.isfinite(a).all() for a in a4.values())


def largest_param(workdir, step) -> float:
  return max(np.abs(a).max() for k, a in final_arrays(workdir, step).items()
             if k.startswith('params.'))


POISONED_LR = {'train.lr': 1e4, 'train.steps': 8, 'checkpoint.every_steps': 1}


def test_poisoned_lr_names_a_good_step_that_resumes_to_the_end(tmp_path):
  """lr 1e4: step 2's update blows the parameters up (still finite), step 3's loss spikes.
  The run stops naming step 1, keep=1 does not prune it, a plain resume from the
  blown-up newest checkpoint stops the same way, and restore_step=1 with the normal lr
  trains to the end (once: the same command again does not go back to step 1)."""
  cfg = small_config(**{**POISONED_LR, 'checkpoint.keep': 1})
  message = (r'^step 3 has a loss spike \(.*\), so training stopped before saving it; the '
             r'last good checkpoint is step 1: resume from it with '
             r'--config\.checkpoint\.restore_step=1 and a lower train\.lr \(it is 10000\)\.$')
  for _ in range(2):
    with pytest.raises(guard_lib.DivergenceError, match=message):
      train_lib.train(cfg, tmp_path, log=lambda _: None)
    assert checkpoint_lib.Checkpointer(tmp_path).steps() == [1, 2]
  assert largest_param(tmp_path, 2) > 100  # blown up.
  cfg = small_config(**{**POISONED_LR, 'train.lr': 3e-3, 'checkpoint.keep': 1,
                        'checkpoint.restore_step': 1})
  logs = []
  summary = train_lib.train(cfg, tmp_path, log=logs.append)
  assert logs[0].startswith('restoring checkpoint.restore_step=1; the newer checkpoints (2) '
                            f'moved to {tmp_path.absolute() / "checkpoints.abandoned"}')
  assert (tmp_path / 'checkpoints.abandoned' / '2' / 'state').is_dir()
  assert summary.steps == 8 and np.isfinite(summary.eval_loss)
  run = losses(tmp_path)
  assert sorted(run) == list(range(1, 9)) and max(run[s] for s in range(2, 9)) < 6.5
  assert checkpoint_lib.Checkpointer(tmp_path).steps() == [7, 8]  # 7: the last good one.
  logs = []
  again = train_lib.train(cfg, tmp_path, log=logs.append)
  assert again.first_step == 8 and 'resuming from the checkpoint at step 8' in logs


def test_skip_nonfinite_never_ends_with_only_blown_up_checkpoints(tmp_path):
  cfg = small_config(**{**POISONED_LR, 'checkpoint.keep': 2, 'train.skip_nonfinite': True})
  logs = []
  with pytest.raises(guard_lib.DivergenceError, match=r'^step 5 has a .* \(3 bad '
                     r'steps in a row\), .* the last good checkpoint is step 1: resume'):
    train_lib.train(cfg, tmp_path, log=logs.append)
  assert [line.split(':')[0] for line in logs if 'bad steps in a row' in line] == [
      'step 3', 'step 4']
  steps = checkpoint_lib.Checkpointer(tmp_path).steps()
  assert steps == [1, 3, 4]  # the newest 2, and the last good one.
  assert largest_param(tmp_path, 1) < 5


def test_restore_step_that_does_not_exist_is_one_sentence(saved_run, tmp_path):
  cfg, workdir = copy_run(saved_run, tmp_path)
  cfg.checkpoint.restore_step = 3
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'^checkpoint\.restore_step=3 is '
                     r'not a checkpoint in .* \(there are 2, 4\); pick one of them'):
    train_lib.train(cfg, workdir, log=lambda _: None)
  assert checkpoint_lib.Checkpointer(workdir).steps() == [2, 4]


def replace_state_silently(workdir, step, other):
  """Puts the intact `state` item of step `other` in place of `step`'s: it reads back
  without any error, only the values are not the ones saved at `step` (what a flipped bit
  in an uncompressed block does to one array)."""
  state = workdir / 'checkpoints' / str(step) / 'state'
  shutil.rmtree(state)
  shutil.copytree(workdir / 'checkpoints' / str(other) / 'state', state)


def test_silent_corruption_is_caught_by_checksums_and_handled_as_damage(saved_run, tmp_path):
  cfg, workdir = copy_run(saved_run, tmp_path)
  replace_state_silently(workdir, 4, other=2)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  with pytest.raises(checkpoint_lib.ChecksumMismatch,
                     match=r'^opt_state\..*, \.\.\. differ from their saved checksums$'):
    checkpointer.read_arrays(4)
  with pytest.warns(checkpoint_lib.DamagedCheckpointWarning,
                    match=r'checkpoint at step 4 is damaged \(ChecksumMismatch: .* differ'):
    step, state, _ = checkpointer.restore_latest(restore_target(cfg))
  assert step == 2 and int(state.step) == 2
  assert (workdir / 'checkpoints.damaged' / '4' / 'state').is_dir()
