"""A throwaway one-node SLURM cluster on this machine, for tests: slurmctld and slurmd
(Debian's `slurm-wlm`, 22.05) with `AuthType=auth/none`, free ports, and every file
(config, state, spool, logs) in one temporary folder.

  with SlurmCluster(tmp_dir, cpus=4) as cluster:
    job = cluster.sbatch(['--ntasks-per-node=2', 'script.sbatch'], env=...)
    cluster.wait(job)  # -> {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}

`python tests/slurm_cluster.py FOLDER` runs one until stopped, for trying the launcher by
hand. `SlurmCluster.unavailable()` says why no cluster can start here (None when one can);
entering raises RuntimeError with the daemons' logs when they do not come up (a SLURM
without the auth/none plugin needs munge running and AuthType=auth/munge instead).
"""

import getpass
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from processes import free_port, stop

SBIN = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/usr/local/sbin'])
COMMANDS = ('slurmctld', 'slurmd', 'sbatch', 'srun', 'scancel', 'scontrol', 'sinfo')


def slurm_conf(folder: pathlib.Path, cpus: int, user: str, ctld_port: int,
               slurmd_port: int) -> str:
  """slurm.conf of a one-node cluster named `localhost` whose files all live in `folder`."""
  return '\n'.join([
      'ClusterName=moetraintest',
      'SlurmctldHost=localhost(127.0.0.1)',
      f'SlurmctldPort={ctld_port}',
      f'SlurmdPort={slurmd_port}',
      'AuthType=auth/none',
      'CredType=cred/none',
      f'SlurmUser={user}',
      f'SlurmdUser={user}',
      f'StateSaveLocation={folder}/state',
      f'SlurmdSpoolDir={folder}/spool',
      f'SlurmctldPidFile={folder}/slurmctld.pid',
      f'SlurmdPidFile={folder}/slurmd.pid',
      f'SlurmctldLogFile={folder}/slurmctld.log',
      f'SlurmdLogFile={folder}/slurmd.log',
      'ProctrackType=proctrack/linuxproc',
      'TaskPlugin=task/none',
      'SwitchType=switch/none',
      'MpiDefault=none',
      'SchedulerType=sched/builtin',
      'SelectType=select/cons_tres',
      'SelectTypeParameters=CR_CPU',
      'ReturnToService=2',
      # The node may declare more CPUs than this machine has (2-core CI machines).
      'SlurmdParameters=config_overrides',
      'JobCompType=jobcomp/none',
      'AccountingStorageType=accounting_storage/none',
      'JobAcctGatherType=jobacct_gather/none',
      f'NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN',
      'PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP',
  ]) + '\n'


class SlurmCluster:
  """slurmctld + slurmd in the foreground as child processes; stopped on exit."""

  def __init__(self, folder, cpus: int = 4, start_timeout: float = 60):
    self.folder = pathlib.Path(folder)
    self.cpus = cpus
    self.start_timeout = start_timeout
    self.conf = self.folder / 'slurm.conf'
    self._daemons = []

  @staticmethod
  def unavailable() -> str | None:
    """Why no cluster can start here, or None."""
    missing = [c for c in COMMANDS if shutil.which(c, path=SBIN) is None]
    if missing:
      return (f'SLURM is not installed ({", ".join(missing)} not found): '
              'apt-get install slurmd slurmctld slurm-client (.ci/run does)')
    return None

  def env(self, **extra) -> dict:
    """The environment for SLURM commands that talk to this cluster."""
    return dict(os.environ, PATH=SBIN, SLURM_CONF=str(self.conf), **extra)

  def __enter__(self):
    for sub in ('state', 'spool'):
      (self.folder / sub).mkdir(parents=True, exist_ok=True)
    self.conf.write_text(slurm_conf(self.folder, self.cpus, getpass.getuser(), free_port(),
                                    free_port()))
    for command in (['slurmctld', '-D', '-i'], ['slurmd', '-D', '-N', 'localhost']):
      self._daemons.append(subprocess.Popen(
          [shutil.which(command[0], path=SBIN), *command[1:], '-f', str(self.conf)],
          env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
          start_new_session=True))
    try:
      self._wait_idle()
    except Exception:
      self.close()
      raise
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def _wait_idle(self):
    deadline = time.monotonic() + self.start_timeout
    state = ''
    while time.monotonic() < deadline:
      for daemon in self._daemons:
        if daemon.poll() is not None:
          raise RuntimeError(f'{daemon.args[0]} exited with {daemon.returncode}:\n'
                             + self.logs())
      out = self.run(['sinfo', '-h', '-o', '%T'], check=False)
      state = out.stdout.strip()
      if state == 'idle':
        return
      time.sleep(0.5)
    raise RuntimeError(f'the node did not become idle in {self.start_timeout:.0f} s '
                       f'(state {state!r}):\n' + self.logs())

  def logs(self) -> str:
    """The tails of the daemons' logs."""
    tails = []
    for name in ('slurmctld.log', 'slurmd.log'):
      path = self.folder / name
      text = path.read_text(errors='replace') if path.exists() else '(none)'
      tails.append(f'--- {name}\n' + '\n'.join(text.splitlines()[-20:]))
    return '\n'.join(tails)

  def run(self, command, check=True, **env) -> subprocess.CompletedProcess:
    """Runs a SLURM client command against this cluster."""
    out = subprocess.run(command, env=self.env(**env), capture_output=True, text=True,
                         timeout=60)
    if check and out.returncode:
      raise RuntimeError(f'{" ".join(command)} failed: {out.stderr}\n{self.logs()}')
    return out

  def sbatch(self, args, env: dict, cwd) -> str:
    """Submits a batch job (sbatch ARGS, with `env` exported to it); returns its id."""
    out = subprocess.run(['sbatch', '--parsable', *args], cwd=cwd,
                         env={**env, 'PATH': SBIN, 'SLURM_CONF': str(self.conf)},
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
      raise RuntimeError(f'sbatch failed: {out.stderr}\n{self.logs()}')
    return out.stdout.strip().split(';')[0]

  def job(self, job_id: str) -> dict:
    """scontrol's fields of a job (JobState, ExitCode, NumTasks, ...)."""
    out = self.run(['scontrol', 'show', 'job', '-o', job_id])
    return dict(field.split('=', 1) for field in out.stdout.split() if '=' in field)

  def wait(self, job_id: str, timeout: float = 600) -> dict:
    """Waits for a job to end; returns its scontrol fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      info = self.job(job_id)
      if info['JobState'] not in ('PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING'):
        return info
      time.sleep(0.5)
    self.run(['scancel', job_id], check=False)
    raise TimeoutError(f'job {job_id} still {info["JobState"]} after {timeout:.0f} s')

  def close(self):
    """Cancels what still runs and stops the daemons."""
    if self._daemons and self._daemons[0].poll() is None:
      self.run(['scancel', '--user', getpass.getuser()], check=False)
    for daemon in reversed(self._daemons):
      stop(daemon, timeout=30)
    self._daemons = []


def main(folder: str):
  """Runs a cluster in `folder` until SIGTERM or Ctrl-C, for trying launch/slurm.sbatch by
  hand (see the README's multi-host section)."""
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  with SlurmCluster(pathlib.Path(folder).absolute()) as cluster:
    print(f'export SLURM_CONF={cluster.conf} PATH=$PATH:/usr/sbin  # stop: kill {os.getpid()}',
          flush=True)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      pass


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python tests/slurm_cluster.py FOLDER')
  main(sys.argv[1])
