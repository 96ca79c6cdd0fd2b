"""Multi-host: launch/local.sh starts 2 real processes (2 CPU devices each) that form one
4-device mesh; the run equals the same config in one process with 4 devices."""

import subprocess
import sys

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
