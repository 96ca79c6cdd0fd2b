"""launch/tpu_pod.sh end to end: `--dry-run` prints the gcloud command, and the same command
run against a stub gcloud (tests/gcloud_stub.py: 2 workers of 2 simulated CPU devices, as
local processes) clones a snapshot of this checkout on each worker, runs the install
command and trains; the run equals one process with 4 devices. The workdir has a space and
a quote in its name, so every level of quoting is exercised."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from multihost_runs import ARGS, FAST_COMPILE, ROOT, assert_same_run, env

BRANCH = 'pod-test'


def snapshot(folder: pathlib.Path) -> pathlib.Path:
  """A git repository whose branch BRANCH holds this checkout's code and configs."""
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for name in ('moetrain', 'configs'):
    shutil.copytree(ROOT / name, folder / name, ignore=ignore)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, folder / name)
  git = ['git', '-C', str(folder), '-c', 'user.name=test', '-c', 'user.email=test@localhost']
  for command in (['init', '-q', '-b', BRANCH], ['add', '-A'], ['commit', '-q', '-m', 'snapshot']):
    subprocess.run(git + command, check=True, capture_output=True)
  return folder


@pytest.fixture
def pod_env(tmp_path):
  if shutil.which('git') is None:
    pytest.skip('git is not installed: the pod script clones the repository on each worker')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  stub = bin_dir / 'gcloud'
  stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} '
                  f'{shlex.quote(str(ROOT / "tests" / "gcloud_stub.py"))} "$@"\n')
  stub.chmod(0o755)
  return env(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', TPU_NAME='test-pod',
             ZONE='us-central2-b', REPO=str(snapshot(tmp_path / 'origin')), BRANCH=BRANCH,
             # The workers have no registry: the install step uses this test's environment
             # with the worker's clone first on the path.
             INSTALL=f'. {shlex.quote(sys.prefix)}/bin/activate && export PYTHONPATH=$PWD',
             GCLOUD_STUB_DIR=str(tmp_path / 'pod'), GCLOUD_STUB_XLA_FLAGS=FAST_COMPILE)


def test_dry_run_command_trains_on_two_workers(tmp_path, pod_env, one_process_run):
  workdir = tmp_path / "pod run's dir"
  args = [f'--workdir={workdir}', *ARGS]
  dry = subprocess.run(['launch/tpu_pod.sh', '--dry-run', *args], cwd=ROOT, env=pod_env,
                       capture_output=True, text=True, timeout=60)
  assert dry.returncode == 0, dry.stderr
  printed = shlex.split(dry.stdout)
  assert printed[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'test-pod',
                         '--zone=us-central2-b', '--worker=all']
  assert not (tmp_path / 'pod').exists()  # a dry run runs nothing.

  out = subprocess.run(['launch/tpu_pod.sh', *args], cwd=ROOT, env=pod_env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert json.loads((tmp_path / 'pod' / 'argv.json').read_text()) == printed[1:]
  logs = [(tmp_path / 'pod' / f'worker_{i}' / 'log').read_text() for i in range(2)]
  for i in range(2):  # each worker cloned the branch.
    head = subprocess.run(['git', '-C', str(tmp_path / 'pod' / f'worker_{i}' / 'moetrain'),
                           'rev-parse', '--abbrev-ref', 'HEAD'], capture_output=True, text=True)
    assert head.stdout.strip() == BRANCH
  assert "on mesh {'data': 1, 'fsdp': 1, 'expert': 4}" in logs[0]
  assert 'final eval loss' in logs[0]
  assert 'final eval loss' not in logs[1]  # process 0 reports alone.
  assert_same_run(workdir, one_process_run)


def test_names_the_missing_setting(pod_env):
  out = subprocess.run(['launch/tpu_pod.sh', '--dry-run', '--config=configs/tiny.py'],
                       cwd=ROOT, env={**pod_env, 'TPU_NAME': ''}, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode != 0 and 'set TPU_NAME to the TPU VM name' in out.stderr
