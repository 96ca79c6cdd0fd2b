"""Performance harness: matmul rate, per-config compile / step time / tokens/s / MFU, the
speed ratios R1-R4, as JSON and a table.

  python bench/run.py                 # everything, ~3-4 min on 2 busy CPU cores
  python bench/run.py --d-model=256 --batch-size=8 --steps=3   # small, ~1 min
  python bench/run.py --a2a-only      # R4 alone (8 simulated devices)
  python bench/run.py --no-a2a --d-model=1024 --batch-size=64 --matmul-n=8192 \
      --configs=dense,moe8,moe64,drop_ragged,drop_padded   # one GPU (bench/gpu_check.sh)

Timings are interleaved: each round measures the matmul rate once and runs every config for
a few steps (in a rotated order), so slow phases of a shared machine hit all configs alike;
each number is a median over all rounds' steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys

if not __package__:  # `python bench/run.py`, as the README writes it: the repo root
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # holds bench/.

from bench import configs  # noqa: E402 -- no jax import: a2a_measure sets XLA_FLAGS first

ROOT = pathlib.Path(__file__).resolve().parent.parent
A2A_DEVICES = 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default='dense,moe8,moe64')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=2, help='timed steps per config per round')
  p.add_argument('--warmup', type=int, default=2)
  configs.add_size_flags(p)
  p.add_argument('--matmul-n', type=int, default=2048)
  p.add_argument('--out', default=None, help='JSON path (default bench/results/<time>.json)')
  p.add_argument('--no-a2a', action='store_true', help='skip R4')
  p.add_argument('--a2a-only', action='store_true',
                 help='compile moe8 on 8 simulated devices and print the all-to-all JSON')
  return p.parse_args(argv)


def a2a_measure() -> dict:
  """R4 in this process; needs 8 devices (XLA_FLAGS set here, before jax is imported)."""
  if 'jax' not in sys.modules:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={A2A_DEVICES}'
  import jax
  from bench import harness
  assert jax.device_count() == A2A_DEVICES, jax.device_count()
  cfg = configs.moe8()
  cfg.mesh.data, cfg.mesh.expert = 1, A2A_DEVICES
  b = harness.StepBench('moe8_ep8', cfg)
  b.run(1, record=False)  # it also runs
  count, op_bytes = harness.all_to_all_bytes(b.hlo_text())
  minimum = harness.min_all_to_all_bytes(cfg, A2A_DEVICES, A2A_DEVICES)
  crossing = (A2A_DEVICES - 1) / A2A_DEVICES
  return dict(config='moe8 on mesh data=1 x expert=8', capacity_factor=cfg.model.moe.capacity_factor,
              all_to_all_ops=count, operand_bytes_per_device=op_bytes,
              min_bytes_per_device=minimum,
              wire_bytes_all_devices=op_bytes * A2A_DEVICES * crossing,
              min_wire_bytes_all_devices=minimum * A2A_DEVICES * crossing,
              ratio=op_bytes / minimum, compile_s=b.compile_s)


def a2a_subprocess(d_model: int, batch_size: int) -> dict:
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '')
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={A2A_DEVICES}'.strip()
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
  out = subprocess.run([sys.executable, '-m', 'bench.run', '--a2a-only',
                        f'--d-model={d_model}', f'--batch-size={batch_size}'],
                       cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'R4 subprocess failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  args = parse_args(argv)
  if args.a2a_only:
    configs.set_size(args.d_model, args.batch_size, 'float32')  # R4 counts float32 bytes
    print(json.dumps(a2a_measure()))
    return
  import jax
  from bench import harness

  configs.set_size(args.d_model, args.batch_size, args.dtype)
  names = args.configs.split(',')
  benches = {}
  for name in names:
    benches[name] = harness.StepBench(name, configs.CONFIGS[name]())
    benches[name].run(args.warmup, record=False)
    print(f'{name}: compiled in {benches[name].compile_s:.1f} s', flush=True)
  dtype = harness.default_matmul_dtype()
  rates = []
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      rates.append(harness.matmul_rate(args.matmul_n, dtype, repeats=3))
      benches[name].run_round(args.steps, rates[-1])
    print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
        f"{n} {benches[n].rounds[-1]['step_s'] * 1e3:.0f} ms" for n in names), flush=True)
  rate = statistics.median(rates)
  results = [benches[n].result() for n in names]
  by = {r['config']: r for r in results}
  div = lambda a, b: harness.paired_ratio(by[a], by[b]) if a in by and b in by else None

  a2a = None if args.no_a2a else a2a_subprocess(args.d_model, args.batch_size)
  result = dict(
      time=datetime.datetime.now().isoformat(timespec='seconds'),
      backend=jax.default_backend(), devices=jax.device_count(),
      command=' '.join(sys.argv), jax_version=jax.__version__,
      d_model=args.d_model, batch_size=args.batch_size, dtype=configs.DTYPE,
      matmul=dict(n=args.matmul_n, dtype=str(jax.numpy.dtype(dtype)), flops_per_s=rate,
                  all=rates),
      configs=results,
      all_to_all=a2a,
      ratios=dict(
          R1=harness.ratio('step(moe8, E=8 k=2) / step(dense, same active)',
                           div('moe8', 'dense'), '<=1.25'),
          R2=harness.ratio('step(moe64) / step(moe8), same k and expert size',
                           div('moe64', 'moe8'), '<=1.3'),
          R3=harness.ratio('MFU of moe8', by['moe8']['mfu'] if 'moe8' in by else None,
                           '>=0.5'),
          R4=harness.ratio('all-to-all bytes / minimum, ep=8, cf=1.0',
                           a2a['ratio'] if a2a else None, '<=1.25'),
      ))
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = harness.write_json(result, args.out or ROOT / 'bench' / 'results' / f'{stamp}.json')
  print()
  print(harness.table(result))
  print(f'\nwrote {path}')


if __name__ == '__main__':
  main()
