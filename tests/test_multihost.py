"""Multi-host: launch/local.sh starts 2 real processes (2 CPU devices each) that form one
4-device mesh; the run equals the same config in one process with 4 devices up to the
order of the cross-process sums (1e-6, see multihost_runs.assert_same_run); a process that
dies stops the other."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from multihost_runs import ARGS, FAST_COMPILE, ROOT, assert_same_run, env


def test_two_processes_equal_one(tmp_path, one_process_run):
  two = tmp_path / 'two'
  out = subprocess.run(
      ['launch/local.sh', '2', sys.executable, '-m', 'moetrain.cli', 'train',
       f'--workdir={two}', *ARGS], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=env(LOG_DIR=str(tmp_path / 'logs'), EXTRA_XLA_FLAGS=FAST_COMPILE))
  logs = '\n'.join(p.read_text() for p in sorted((tmp_path / 'logs').glob('*.log')))
  assert out.returncode == 0, out.stderr + logs[-3000:]
  assert 'final eval loss' in out.stdout  # process 0 reports ...
  assert 'final eval loss' not in (tmp_path / 'logs' / 'process_1.log').read_text()  # alone.
  assert_same_run(two, one_process_run)


def pid_of(*fragments) -> int:
  """The pid of the one process whose command line holds all `fragments`."""
  found = []
  for proc in pathlib.Path('/proc').iterdir():
    try:
      cmdline = (proc / 'cmdline').read_bytes().replace(b'\0', b' ').decode()
    except (OSError, ValueError):
      continue
    if proc.name.isdigit() and all(f in cmdline for f in fragments):
      found.append(int(proc.name))
  assert len(found) == 1, found
  return found[0]


def test_a_dead_process_stops_the_other_naming_it(tmp_path):
  """Process 1 is killed mid-run: process 0 stops on its own with one line naming it (the
  peer watch, after --heartbeat_timeout=10 s, not JAX's 100 s abort with a stack dump),
  and launch/local.sh names both as they end."""
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  launcher = subprocess.Popen(
      ['launch/local.sh', '2', sys.executable, '-m', 'moetrain.cli', 'train',
       f'--workdir={workdir}', *ARGS, '--config.train.steps=500'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env(LOG_DIR=str(logs), EXTRA_XLA_FLAGS='--xla_backend_optimization_level=0'))
  try:
    metrics = workdir / 'metrics.jsonl'
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      assert launcher.poll() is None, launcher.communicate()
      time.sleep(0.1)
    os.kill(pid_of(f'--workdir={workdir}', '--process_id=1'), signal.SIGKILL)
    _, err = launcher.communicate(timeout=200)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 1
  process_0 = (logs / 'process_0.log').read_text()
  message = ('moetrain: process 1 stopped responding (no sign of life for 10 s), so process 0 '
             'stops too; see its log, then run the same command again to resume from the '
             'last checkpoint.')
  assert process_0.strip().splitlines()[-1] == message
  assert 'Check failure stack trace' not in process_0
  assert err.strip().splitlines() == [
      f'process 1 failed (killed by SIGKILL); see {logs}/process_1.log',
      f'process 0 failed (exit status 1); see {logs}/process_0.log: {message}']
