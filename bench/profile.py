"""Per-op profile of one bench config's train step: where the step's time goes.

  python bench/profile.py moe8 [--d-model=512 --batch-size=32 --steps=2 --top=40]

Runs the compiled step under `jax.profiler`, sums the XLA op events per step and groups
them by op kind and source (the HLO metadata op_name, e.g. `jvp(ecd,edf->ecf)/dot_general`).
Independent ops run concurrently on the CPU thread pool, so per-op times overlap and their
sum can exceed the step time: read it for proportions, not absolute rates. On a GPU the
kernels' events are not matched by these names (an H100 run summed 1 ms of a 14 ms step),
so there it does not yet say where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile

if not __package__:  # `python bench/profile.py`: the repo root holds bench/.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('config')
  configs.add_size_flags(p)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--top', type=int, default=40)
  args = p.parse_args(argv)
  import jax
  from bench import harness
  configs.set_size(args.d_model, args.batch_size, args.dtype)
  b = harness.StepBench(args.config, configs.CONFIGS[args.config]())
  b.run(2, record=False)
  source = {}
  for line in b.hlo_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', line)
    if m:
      source[m.group(1)] = m.group(2).replace('jit(train_step)/', '')
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    b.run(args.steps)
    jax.profiler.stop_trace()
    events = json.load(gzip.open(glob.glob(f'{d}/**/*.trace.json.gz',
                                           recursive=True)[0]))['traceEvents']
  per_op = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and name in source or (e.get('ph') == 'X' and re.match(
        r'^[a-z_\-]+(\.\d+)?$', name) and 'Thunk' not in name):
      per_op[f"{name.split('.')[0]:<28} {source.get(name, '')[-90:]}"] += \
          e['dur'] / 1e3 / args.steps
  total = sum(per_op.values())
  matmul = sum(v for k, v in per_op.items() if 'dot_general' in k)
  step = sorted(b.times)[len(b.times) // 2]
  print(f'{args.config} d_model {args.d_model} batch {args.batch_size}: step {step * 1e3:.0f} ms;'
        f' op time {total:.0f} ms/step, of which dot_general {matmul:.0f} ms '
        f'({matmul / total:.0%})')
  for key, ms in per_op.most_common(args.top):
    print(f'{ms:9.1f} ms  {key}')


if __name__ == '__main__':
  main()
