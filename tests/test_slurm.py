"""SLURM for real: a one-node cluster on this machine (tests/slurm_cluster.py) runs the
shipped launch/slurm.sbatch with 2 tasks of 2 simulated CPU devices each
(MOETRAIN_CPU_DEVICES=2). Both tasks join one 4-device mesh through `--distributed`;
`scancel --signal=TERM` makes them save and exit; the resubmitted job resumes, and the run
equals one process with 4 devices step for step."""

import re
import sys
import time

import pytest

from moetrain import checkpoint as checkpoint_lib
from moetrain import metrics as metrics_lib
from multihost_runs import ARGS, FAST_COMPILE, ROOT, STEPS, assert_same_run, env
from processes import free_port
from slurm_cluster import SlurmCluster


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  reason = SlurmCluster.unavailable()
  if reason:
    pytest.skip(reason)
  cluster = SlurmCluster(tmp_path_factory.mktemp('slurm'))
  try:
    cluster.__enter__()
  except RuntimeError as e:
    pytest.skip(f'the SLURM daemons did not start on this machine: {e}')
  yield cluster
  cluster.close()


def logged_steps(workdir) -> int:
  path = workdir / 'metrics.jsonl'
  return sum('loss' in r for r in metrics_lib.read_jsonl(path)) if path.exists() else 0


def test_sbatch_preempted_and_resubmitted_equals_one_process(cluster, tmp_path,
                                                             one_process_run):
  workdir = tmp_path / 'run'

  def submit(name):
    job = cluster.sbatch(
        ['--gpus-per-node=0', '--ntasks-per-node=2', '--cpus-per-task=1',
         f'--output={tmp_path / name}.out', 'launch/slurm.sbatch', f'--workdir={workdir}',
         *ARGS], cwd=ROOT,
        env=env(MOETRAIN_CPU_DEVICES='2', MOETRAIN_VENV=sys.prefix,
                EXTRA_XLA_FLAGS=FAST_COMPILE, JAX_COORDINATOR_PORT=str(free_port())))
    return job, tmp_path / f'{name}.out'

  first, first_out = submit('first')
  deadline = time.monotonic() + 300
  while not logged_steps(workdir) and time.monotonic() < deadline:
    assert cluster.job(first)['JobState'] in ('PENDING', 'CONFIGURING', 'RUNNING'), \
        first_out.read_text()[-3000:]
    time.sleep(0.2)
  cluster.run(['scancel', '--signal=TERM', first])
  info, out = cluster.wait(first), first_out.read_text()
  assert (info['JobState'], info['ExitCode'], info['NumTasks']) == ('COMPLETED', '0:0', '2'), \
      out[-3000:]
  # 2 tasks x 2 devices make the 4-device mesh only when joined; process 0 alone reports.
  assert out.count("on mesh {'data': 1, 'fsdp': 1, 'expert': 4}") == 1, out[-3000:]
  assert 'SIGTERM received: saving a checkpoint at step' in out
  stopped = int(re.search(r'stopped by a signal at step (\d+)', out).group(1))
  assert 1 <= stopped < STEPS
  assert checkpoint_lib.Checkpointer(workdir).steps() == [stopped]

  second, second_out = submit('second')
  info, out = cluster.wait(second), second_out.read_text()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), out[-3000:]
  assert f'resuming from the checkpoint at step {stopped}' in out
  assert out.count('final eval loss') == 1
  assert_same_run(workdir, one_process_run)
