"""A stand-in for `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command=CMD`
that runs CMD once per simulated TPU worker as a local process (the way launch/tpu_pod.sh
uses gcloud), for tests/test_tpu_pod.py.

Settings from the environment: GCLOUD_STUB_DIR (required) gets argv.json (the arguments
gcloud was called with) and worker_I/ (each worker's home and working directory, with its
output in worker_I/log); GCLOUD_STUB_WORKERS (default 2) workers, each with
GCLOUD_STUB_DEVICES (default 2) simulated CPU devices; GCLOUD_STUB_XLA_FLAGS are appended
to XLA_FLAGS. The workers find each other through JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which `moetrain train --distributed` reads where a
TPU VM has its metadata server. Exits with the first failing worker's status.
"""

import json
import os
import pathlib
import subprocess
import sys

from processes import free_port

PREFIX = ['compute', 'tpus', 'tpu-vm', 'ssh']
OPTIONS = ('--zone', '--worker', '--command', '--project')


def parse(argv: list[str]) -> dict:
  """The TPU name and the --options of a tpu-vm ssh command line; exits 2 on anything else."""
  if argv[:4] != PREFIX or len(argv) < 5 or argv[4].startswith('-'):
    sys.exit(f'gcloud stub: expected `gcloud {" ".join(PREFIX)} NAME --option=...`, got {argv}')
  parsed = {'name': argv[4]}
  for arg in argv[5:]:
    key, sep, value = arg.partition('=')
    if key not in OPTIONS or not sep:
      sys.exit(f'gcloud stub: unexpected argument {arg!r}')
    parsed[key[2:]] = value
  for key in ('zone', 'worker', 'command'):
    if key not in parsed:
      sys.exit(f'gcloud stub: missing --{key}')
  return parsed


def main():
  args = parse(sys.argv[1:])
  folder = pathlib.Path(os.environ['GCLOUD_STUB_DIR'])
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'argv.json').write_text(json.dumps(sys.argv[1:]))
  workers = int(os.environ.get('GCLOUD_STUB_WORKERS', '2'))
  if args['worker'] != 'all':
    sys.exit(f'gcloud stub: only --worker=all is simulated, got {args["worker"]!r}')
  port = free_port()
  devices = os.environ.get('GCLOUD_STUB_DEVICES', '2')
  base = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  processes = []
  for i in range(workers):
    home = folder / f'worker_{i}'
    home.mkdir(parents=True, exist_ok=True)
    env = dict(base, HOME=str(home), JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES=str(workers), JAX_PROCESS_ID=str(i), JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                         + os.environ.get('GCLOUD_STUB_XLA_FLAGS', ''))
    with open(home / 'log', 'w') as log:
      processes.append(subprocess.Popen(['bash', '-c', args['command']], cwd=home, env=env,
                                        stdout=log, stderr=subprocess.STDOUT))
  codes = [p.wait() for p in processes]
  for i in range(workers):
    sys.stdout.write(f'--- worker {i}\n' + (folder / f'worker_{i}' / 'log').read_text())
  sys.exit(next((code for code in codes if code), 0))


if __name__ == '__main__':
  main()
