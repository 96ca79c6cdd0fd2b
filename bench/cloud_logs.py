"""TensorBoard events into a bucket two ways, against the local GCS emulator: tensorboardX
writing gs:// itself, or moetrain's MetricWriter (events and JSONL written locally,
uploaded whole at each flush, moetrain.staged). Each way logs the same steps (10 scalars
and one 64-value histogram per step, like a small MoE run) in a child process, flushing
every --flush_every steps (training flushes before each checkpoint), and the child's
wall time to exit is measured (tensorboardX uploads once more at interpreter exit; the
staged writer also writes and uploads the JSONL).

  PYTHONPATH=.:tests python bench/cloud_logs.py [--steps=2000 --flush_every=50]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import gcs_emulator  # noqa: E402

CHILD = '''
import sys
import numpy as np
from moetrain import metrics  # both pay for importing jax.
how, root, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
if how == 'tensorboardx':
  from tensorboardX import SummaryWriter
  writer = SummaryWriter(root + '/tb')
  def write(step, metrics):
    for name, value in metrics.items():
      if np.ndim(value):
        writer.add_histogram(name, value, step, bins='auto')
      else:
        writer.add_scalar(name, value, step)
else:
  writer = metrics.MetricWriter(root, enabled=True, sync_seconds=float('inf'))
  write = writer.write
for step in range(1, steps + 1):
  values = {f'scalar{i}': float(rng.normal()) for i in range(10)}
  values['load'] = rng.random(64)
  write(step, values)
  if step % every == 0:
    writer.flush()
writer.close()
'''


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--flush_every', type=int, default=50)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder, gcs_emulator.start(folder) as gcs:
    env = {**os.environ, **gcs.env}
    for how in ('tensorboardx', 'staged'):
      start = time.perf_counter()
      subprocess.run([sys.executable, '-c', CHILD, how, gcs.path(how), str(args.steps),
                      str(args.flush_every)], env=env, check=True)
      seconds = time.perf_counter() - start
      names = gcs.objects(how + '/')
      size = sum(len(gcs.read(n)) for n in names if '/tb/' in n)
      print(f'{how:>12}: {args.steps} steps, a flush every {args.flush_every}: '
            f'{seconds:.1f} s to exit, {len(names)} objects, events {size:,} bytes')


if __name__ == '__main__':
  main()
