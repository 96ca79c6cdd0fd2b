"""Shared by the multi-process tests (launch/local.sh, SLURM, the TPU pod script): one tiny
training command, the same command in one process with 4 simulated devices (the
reference), and the check that a multi-process run logged and saved the same numbers."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from moetrain import checkpoint as checkpoint_lib
from moetrain import metrics as metrics_lib

ROOT = pathlib.Path(__file__).parents[1]
STEPS, EVAL_EVERY = 20, 10
ARGS = ['--config=configs/tiny.py', '--config.mesh.expert=4', '--config.model.d_model=32',
        '--config.model.num_layers=2', '--config.model.d_ff=64',
        '--config.data.max_documents=40', '--config.data.eval_fraction=0.25',
        '--config.data.batch_size=8', '--config.data.seq_len=32',
        f'--config.train.steps={STEPS}', '--config.train.warmup_steps=1',
        '--config.train.log_every=1', f'--config.train.eval_every={EVAL_EVERY}',
        '--config.train.eval_batches=2', '--config.train.progress=False']
FAST_COMPILE = '--xla_backend_optimization_level=0'


def env(**extra) -> dict:
  """This environment with the checkout first on the path (and `extra` set)."""
  return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def losses(workdir):
  """(logged steps, training losses, eval losses) of a run's metrics.jsonl."""
  records = metrics_lib.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  train = [r for r in records if 'loss' in r]
  return ([r['step'] for r in train], [r['loss'] for r in train],
          [r['eval/loss'] for r in records if 'eval/loss' in r])


def train_one_process(workdir) -> pathlib.Path:
  """Runs ARGS in one process on 4 simulated CPU devices; returns its workdir."""
  out = subprocess.run(
      [sys.executable, '-m', 'moetrain.cli', 'train', f'--workdir={workdir}', *ARGS],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=env(XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {FAST_COMPILE}'))
  assert out.returncode == 0, out.stderr[-3000:]
  return pathlib.Path(workdir)


def assert_same_run(workdir, reference):
  """`workdir` logged every step once with the losses, eval losses and final parameters
  of `reference` (a run of ARGS), to 1e-6: not bit-exact, because the gradient all-reduce
  adds the devices' parts in another order across processes (gloo) than within one. The
  gap is printed (pytest -s); the README quotes it."""
  (steps, train, evals), (_, train_ref, evals_ref) = losses(workdir), losses(reference)
  assert steps == list(range(1, STEPS + 1))
  assert len(evals) == STEPS // EVAL_EVERY
  params = checkpoint_lib.Checkpointer(workdir).read_arrays(STEPS)
  params_ref = checkpoint_lib.Checkpointer(reference).read_arrays(STEPS)
  assert params.keys() == params_ref.keys()
  rel = lambda a, b: float(np.max(np.abs(np.subtract(a, b)) / np.abs(b)))
  print(f'\nmulti-process vs one: {np.sum(np.equal(train, train_ref))} of {len(train_ref)} '
        f'step losses bit-equal, max relative difference {rel(train, train_ref):.2g}; eval '
        f'{rel(evals, evals_ref):.2g}; parameters max absolute difference '
        f'{max(np.abs(params[k] - params_ref[k]).max() for k in params_ref):.2g}')
  np.testing.assert_allclose(train, train_ref, rtol=1e-6)
  np.testing.assert_allclose(evals, evals_ref, rtol=1e-6)
  for key in params_ref:
    np.testing.assert_allclose(params[key], params_ref[key], rtol=1e-6, atol=1e-6,
                               err_msg=key)
