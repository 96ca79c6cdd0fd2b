"""Performance harness: matmul rate, per-config compile / step time / tokens/s / MFU, the
speed ratios R1-R4, as JSON and a table.

  python bench/run.py                 # everything, ~3-4 min on 2 busy CPU cores
  python bench/run.py --d-model=256 --batch-size=8 --steps=3   # small, ~1 min
  python bench/run.py --a2a-only      # R4 alone (8 simulated devices)
  python bench/run.py --no-a2a --mode=sequential --matmul-n=8192 \
      --configs=dense_1b,moe8_1b,moe64_1b,moe8_1b_dropless   # one GPU (bench/gpu_check.sh)

Timings are interleaved by default: each round measures the matmul rate once and runs every
config for a few steps (in a rotated order), so slow phases of a shared machine hit all
configs alike; each number is a median over all rounds' steps. `--mode=sequential` builds,
times and frees one config after the other (the ~1B configs' states do not all fit on one
GPU at once; a dedicated GPU does not need the interleaving).

Ratios: R1-R4 for the small configs (dense, moe8, moe64), G1-G4 for the ~1B ones (issue 17:
MFU against the datasheet peak, fine-grained against coarse experts, dropless against a
capacity factor of 1.25); each is printed when its configs ran.
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
  p.add_argument('--mode', default='interleaved', choices=('interleaved', 'sequential'),
                 help='interleave the configs in every round, or run (and free) one at a time')
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


def measure(names, args, peak) -> tuple[list[dict], list[float]]:
  """Builds and times every config (`args.mode`); returns their results and the matmul
  rates measured along the way."""
  from bench import harness
  dtype = harness.default_matmul_dtype()
  rates = []

  def build(name):
    b = harness.StepBench(name, configs.CONFIGS[name]())
    b.run(args.warmup, record=False)
    print(f'{name}: compiled in {b.compile_s:.1f} s', flush=True)
    return b

  def time_round(b):
    rates.append(harness.matmul_rate(args.matmul_n, dtype, repeats=3))
    b.run_round(args.steps, rates[-1])

  if args.mode == 'sequential':
    results = []
    for name in names:
      b = build(name)
      for _ in range(args.rounds):
        time_round(b)
      results.append(b.result(peak))
      print(f"{name}: {results[-1]['step_s'] * 1e3:.1f} ms/step", flush=True)
      del b  # frees its state before the next config is built
    return results, rates
  benches = {name: build(name) for name in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      time_round(benches[name])
    print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
        f"{n} {benches[n].rounds[-1]['step_s'] * 1e3:.0f} ms" for n in names), flush=True)
  return [benches[n].result(peak) for n in names], rates


def ratios(results: list[dict], a2a: dict | None) -> dict:
  """R1-R4 (small configs) and G1-G4 (~1B configs, issue 17) from the configs that ran."""
  from bench import harness
  by = {r['config']: r for r in results}
  div = lambda a, b: harness.paired_ratio(by[a], by[b]) if a in by and b in by else None
  get = lambda name, key: by[name][key] if name in by else None
  out = {}
  if {'dense', 'moe8', 'moe64'} & by.keys() or a2a:
    out.update(
        R1=harness.ratio('step(moe8, E=8 k=2) / step(dense, same active)',
                         div('moe8', 'dense'), '<=1.25'),
        R2=harness.ratio('step(moe64) / step(moe8), same k and expert size',
                         div('moe64', 'moe8'), '<=1.3'),
        R3=harness.ratio('MFU of moe8', get('moe8', 'mfu'), '>=0.5'),
        R4=harness.ratio('all-to-all bytes / minimum, ep=8, cf=1.0',
                         a2a['ratio'] if a2a else None, '<=1.25'))
  if any(name.endswith('_1b') or '_1b_' in name for name in by):
    out.update(
        G1=harness.ratio('MFU/peak of moe8_1b (E=8 top-2, cf 1.25)',
                         get('moe8_1b', 'mfu_peak'), '>=0.40'),
        G2=harness.ratio('MFU/peak of moe64_1b (E=64 top-8, cf 1.25)',
                         get('moe64_1b', 'mfu_peak'), '>=0.35'),
        G3=harness.ratio('step(moe64_1b) / step(moe8_1b), equal active',
                         div('moe64_1b', 'moe8_1b'), '<=1.3'),
        G4=harness.ratio('step(moe8_1b_dropless) / step(moe8_1b, cf 1.25)',
                         div('moe8_1b_dropless', 'moe8_1b'), '<=1.0'))
    for name in by:  # every other dropless variant against its capacity-factor twin
      base = name.split('_1b')[0] + '_1b'
      if name.startswith('moe') and name not in (base, 'moe8_1b_dropless') and base in by:
        out[f'{name}/{base}'] = harness.ratio(f'step({name}) / step({base})',
                                              div(name, base), '<=1.0')
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.a2a_only:
    configs.set_size(args.d_model, args.batch_size, 'float32')  # R4 counts float32 bytes
    print(json.dumps(a2a_measure()))
    return
  import jax
  from bench import harness

  configs.set_size(args.d_model, args.batch_size, args.dtype, args.set)
  names = args.configs.split(',')
  unknown = [n for n in names if n not in configs.CONFIGS]
  if unknown:
    raise SystemExit(f'--configs: unknown {", ".join(unknown)}; known: '
                     f'{", ".join(configs.CONFIGS)}.')
  device_kind = jax.devices()[0].device_kind
  peak = harness.peak_flops(device_kind)
  results, rates = measure(names, args, peak)
  rate = statistics.median(rates)
  a2a = None if args.no_a2a else a2a_subprocess(args.d_model, args.batch_size)
  result = dict(
      time=datetime.datetime.now().isoformat(timespec='seconds'),
      backend=jax.default_backend(), devices=jax.device_count(), device_kind=device_kind,
      peak_flops_per_s=peak, mode=args.mode,
      command=' '.join(sys.argv), jax_version=jax.__version__,
      d_model=args.d_model, batch_size=args.batch_size, dtype=configs.DTYPE,
      matmul=dict(n=args.matmul_n, dtype=str(jax.numpy.dtype(harness.default_matmul_dtype())),
                  flops_per_s=rate, all=rates),
      configs=results,
      all_to_all=a2a,
      ratios=ratios(results, a2a))
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = harness.write_json(result, args.out or ROOT / 'bench' / 'results' / f'{stamp}.json')
  print()
  print(harness.table(result))
  print(f'\nwrote {path}')


if __name__ == '__main__':
  main()
