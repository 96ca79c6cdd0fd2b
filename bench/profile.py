"""Where one bench config's train step spends its time: per category and per op.

  python bench/profile.py moe8 [--d-model=512 --batch-size=32 --steps=2 --top=40 --out=F.json]

Runs the compiled step under `jax.profiler`, maps each op event of the trace to its HLO
instruction (bench/breakdown.py: by name on CPU, by the `hlo_op` arg of each GPU kernel) and
prints the step broken into attention, expert matmuls, dispatch/combine (router included),
all-to-all, other collectives, optimizer and the rest, with the step time, the device busy
time and the UNATTRIBUTED time (op events that map to no instruction of the step: on a
working filter near 0). Then the `--top` ops by time, by op kind and source (the HLO
metadata op_name, e.g. `transpose(jvp(experts))/dot_general`). `--out` writes the breakdown
as JSON. Independent ops run concurrently (the CPU thread pool, GPU streams), so per-op
times overlap and their sum can exceed the step time: read them for proportions.
Any name of bench/configs.CONFIGS works.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import pathlib
import statistics
import sys
import tempfile

if not __package__:  # `python bench/profile.py`: the repo root holds bench/.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import breakdown, configs  # noqa: E402


def profile_step(bench, steps: int) -> dict:
  """Profiles `steps` steps of a warmed-up harness.StepBench; returns the breakdown dict
  (bench/breakdown.py) whose `per_op` sums the instructions by 'opcode op_name'."""
  import jax
  hlo = bench.hlo_text()
  instrs = breakdown.instructions(hlo)
  start = len(bench.times)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    bench.run(steps)
    jax.profiler.stop_trace()
    path, = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = breakdown.device_events(json.load(f))
  result = breakdown.breakdown(events, instrs, steps, breakdown.module_name(hlo),
                               statistics.median(bench.times[start:]))
  per_op = {}
  for name, ms in result['per_op'].items():
    key = f'{instrs[name].opcode:<12} {instrs[name].op_name}'
    per_op[key] = per_op.get(key, 0.0) + ms
  result['per_op'] = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
  return result


def per_op_lines(per_op: dict, top: int) -> list[str]:
  """The `top` largest entries of `per_op` ('opcode op_name' -> ms), the jit prefix cut."""
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return [f"{ms:9.2f} ms  {key.replace('jit(train_step)/', '')[-110:]}" for key, ms in ranked]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('config', choices=sorted(configs.CONFIGS))
  configs.add_size_flags(p)
  p.add_argument('--steps', type=int, default=2, help='profiled steps (after 2 warm-up steps)')
  p.add_argument('--top', type=int, default=40, help='ops listed after the breakdown')
  p.add_argument('--out', help='write the breakdown as JSON to this file (must not exist)')
  args = p.parse_args(argv)
  if args.out and pathlib.Path(args.out).exists():
    p.error(f'--out {args.out} exists; pass a new file name')
  import jax
  from bench import harness
  configs.set_size(args.d_model, args.batch_size, args.dtype, args.set)
  b = harness.StepBench(args.config, configs.CONFIGS[args.config]())
  b.run(2, record=False)
  result = profile_step(b, args.steps)
  print(f'{args.config} d_model {args.d_model} batch {args.batch_size} dtype {configs.DTYPE} '
        f'on {jax.devices()[0].device_kind}')
  print(breakdown.format_table(result))
  print(f'top {args.top} ops (ms per step and device):')
  print('\n'.join(per_op_lines(result['per_op'], args.top)))
  if args.out:
    record = dict(config=args.config, d_model=args.d_model, batch_size=args.batch_size,
                  dtype=configs.DTYPE, device=jax.devices()[0].device_kind,
                  jax=jax.__version__, **result)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == '__main__':
  main()
