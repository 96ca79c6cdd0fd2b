"""Runs of `moetrain train` in a subprocess, killed or signalled at chosen points: the
one small config that tests/test_checkpoint.py and tests/test_cloud_workdir.py train, and
what a run logged and saved (the uninterrupted reference run is a session fixture in
conftest.py, shared by both)."""

import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

from moetrain import checkpoint as checkpoint_lib
from moetrain import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# One small model for every checkpoint test: cheap to compile, still MoE on a (data, expert)
# mesh.
SMALL = {'model.d_model': 16, 'model.num_layers': 1, 'model.num_heads': 2,
         'model.num_kv_heads': 1, 'model.d_ff': 32, 'data.seq_len': 16,
         'train.log_every': 1, 'train.eval_every': 100, 'train.eval_batches': 1}

RUN_STEPS = 8
CLI_OVERRIDES = {**SMALL, 'model.vocab_size': 0, 'model.num_experts': 4, 'model.moe.top_k': 2,
                 'data.batch_size': 8, 'data.max_documents': 40, 'data.eval_fraction': 0.25,
                 'train.steps': RUN_STEPS, 'train.warmup_steps': 2, 'train.progress': False,
                 'checkpoint.every_steps': 2, 'checkpoint.keep': 2, 'mesh.expert': 2}

# The CLI, optionally with orbax's final rename of one step held back for 60 s, so that a
# kill is certain to land in the middle of that async save.
DRIVER = '''
import asyncio, os, sys
from orbax.checkpoint._src.path import atomicity
slow = os.environ.get('SLOW_FINALIZE_STEP')
if slow:
  original = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *args, **kwargs):
    if self.get_final().name == slow:
      print(f'FINALIZING {slow}', flush=True)
      await asyncio.sleep(60)
    return await original(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
from moetrain import cli
cli.main(['moetrain'] + sys.argv[1:])
'''


def losses(workdir) -> dict:
  """step -> training loss from metrics.jsonl (appended across resumes: the last wins)."""
  out = {}
  for record in metrics_lib.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl'):
    if 'loss' in record:
      out[record['step']] = record['loss']
  return out


def final_arrays(workdir, step) -> dict:
  return checkpoint_lib.Checkpointer(workdir).read_arrays(step)


def run_cli(env, workdir, *, signal_after_step=None, sig=signal.SIGKILL,
            slow_finalize_step=None, timeout=300, before_signal=None):
  """Runs `moetrain train` on `workdir`; if `signal_after_step`, sends `sig` once this run
  has logged that step (or, with `slow_finalize_step`, once that save is being committed),
  after calling `before_signal()` if given. Returns (exit code, output)."""
  driver = pathlib.Path(workdir).parent / 'driver.py'
  driver.write_text(DRIVER)
  env = dict(env)  # the caller's stays without SLOW_FINALIZE_STEP.
  if slow_finalize_step is not None:
    env['SLOW_FINALIZE_STEP'] = str(slow_finalize_step)
  args = [sys.executable, str(driver), 'train', f'--config={REPO / "configs/tiny.py"}',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in CLI_OVERRIDES.items()]
  metrics = pathlib.Path(workdir) / 'metrics.jsonl'
  seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=REPO)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()

  def reached() -> bool:
    if slow_finalize_step is not None:
      return any(f'FINALIZING {slow_finalize_step}' in line for line in lines)
    if not metrics.exists():
      return False
    new = metrics.read_text().splitlines()[seen:]
    return any(json.loads(l).get('step', 0) >= signal_after_step for l in new if l.strip())

  deadline = time.time() + timeout
  if signal_after_step is not None or slow_finalize_step is not None:
    while not reached():
      assert proc.poll() is None, 'run ended before the signal point:\n' + ''.join(lines)
      assert time.time() < deadline, 'timed out waiting for the signal point'
      time.sleep(0.01)
    if before_signal is not None:
      before_signal()
    proc.send_signal(sig)
  rc = proc.wait(timeout=max(1, deadline - time.time()))
  reader.join(timeout=10)
  return rc, ''.join(lines)
