"""Compile time of the train step against depth: with `model.scan_layers` a 32-layer model
should compile in at most 1.5x the time of a 4-layer model of the same width (one traced
layer per run of layers); unscanned, the program grows with every layer.

  PYTHONPATH=. python bench/compile_time.py                  # scanned 4 vs 32, ~2 min
  PYTHONPATH=. python bench/compile_time.py --unscanned      # also unscanned, for contrast

Each round lowers and compiles a fresh jit of every variant (interleaved, so a slow phase
of a shared machine hits all of them); the table shows medians over rounds and the ratio
median(32 layers) / median(4 layers) of the step's trace + lower + compile. Building the
abstract model and optimizer state first (every layer's weights under `jax.eval_shape`,
then stacked) is timed apart and shown beside it: it grows with depth, scanned or not. The model is the bench base (bench/configs.py: heads
of 64, 8 experts top-2) at --d-model, remat 'full' (what deep models train with).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = 1.5


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--layers', default='4,32', help='shallow,deep')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--unscanned', action='store_true', help='also time unscanned models')
  p.add_argument('--out', default=None, help='JSON path (default bench/results/<time>.json)')
  return p.parse_args(argv)


def config(d_model: int, layers: int, scanned: bool):
  from bench import configs
  configs.set_size(d_model, 8, 'float32')
  return configs.base(**{'model.num_experts': 8, 'model.num_layers': layers,
                         'model.scan_layers': scanned, 'model.remat': 'full'})


def compile_seconds(cfg) -> tuple[float, float]:
  """(seconds to build the abstract model and optimizer state, seconds to trace, lower and
  compile the train step on them) on one device. Building the state constructs every
  layer's (abstract) weights, so it grows with depth either way; the compile is what
  scan_layers keeps flat."""
  import jax
  from moetrain import compile as compile_lib
  from moetrain.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  start = time.perf_counter()
  step, inputs = compile_lib.abstract_step(cfg, mesh)
  built = time.perf_counter()
  with jax.set_mesh(mesh):
    step.lower(*inputs).compile()
  return built - start, time.perf_counter() - built


def main(argv=None):
  args = parse_args(argv)
  shallow, deep = (int(n) for n in args.layers.split(','))
  variants = [(layers, True) for layers in (shallow, deep)]
  if args.unscanned:
    variants += [(layers, False) for layers in (shallow, deep)]
  times = {v: [] for v in variants}
  build = {v: [] for v in variants}
  for r in range(args.rounds):
    for layers, scanned in variants:
      built, seconds = compile_seconds(config(args.d_model, layers, scanned))
      times[layers, scanned].append(seconds)
      build[layers, scanned].append(built)
      print(f'round {r + 1}/{args.rounds}: {layers} layers '
            f'{"scanned" if scanned else "unscanned"}: compile {seconds:.1f} s '
            f'(abstract state {built:.1f} s)', flush=True)
  median = {v: statistics.median(t) for v, t in times.items()}
  print(f'\nd_model {args.d_model}, 8 experts top-2, remat full, train step on one device')
  print(f'{"layers":>6}  {"scan_layers":>11}  {"compile s":>9}  {"state s":>7}')
  for (layers, scanned), seconds in median.items():
    print(f'{layers:>6}  {str(scanned):>11}  {seconds:9.1f}  '
          f'{statistics.median(build[layers, scanned]):7.1f}')
  ratio = median[deep, True] / median[shallow, True]
  verdict = 'ok' if ratio <= TARGET else 'MISSED'
  print(f'\ncompile({deep} layers) / compile({shallow} layers), scanned: {ratio:.2f}  '
        f'target <={TARGET}  {verdict}')
  if args.unscanned:
    print(f'unscanned: {median[deep, False] / median[shallow, False]:.2f}')
  out = pathlib.Path(args.out) if args.out else ROOT / 'bench' / 'results' / (
      f'compile-{datetime.datetime.now():%Y%m%d-%H%M%S}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      d_model=args.d_model, layers=[shallow, deep], ratio=ratio, target=TARGET,
      seconds={f'{l}_{"scanned" if s else "unscanned"}': t for (l, s), t in times.items()},
      state_seconds={f'{l}_{"scanned" if s else "unscanned"}': t
                     for (l, s), t in build.items()}),
      indent=2))
  print(f'wrote {out}')
  return ratio


if __name__ == '__main__':
  main()
