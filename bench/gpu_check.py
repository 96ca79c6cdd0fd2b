"""Checks that need a GPU (or TPU): the ragged code paths, real collectives, bf16.

  PYTHONPATH=.:tests python bench/gpu_check.py [--tiny]   # exits 1 if any check fails

1. `jax.lax.ragged_all_to_all` against tests/ragged_emulation.py (the emulation the CPU
   tests use), on a random plan of E slices with gaps: values and the operand's gradient.
2. Every grouped-matmul path against padded expert buffers (`padded_grouped_swiglu`): the
   SwiGLU experts on rows grouped by expert (empty groups, unused rows at the end as in the
   expert-parallel receive buffer), values of the used rows and gradients of x and the
   three expert weights, float32 (highest matmul precision) and bfloat16. Paths:
   `jax.lax.ragged_dot`; `tokamax.ragged_dot` with each implementation ('mosaic',
   'triton', 'xla'), "not available: <reason>" for one that raises NotImplementedError
   here; jax.lax.ragged_dot with XLA's cuDNN ragged-dot fusion flag, in a subprocess (the
   flag is process-wide), where this jaxlib knows the flag (an unknown flag aborts).
   Each path's line "kernels:" lists the compiled program's custom calls and cuDNN fusions.
3. The dropless layer under expert parallelism (ragged all-to-all, then ragged_dot,
   tokamax, or, as `auto` picks on GPU, padded expert buffers; run inside shard_map with
   the expert axis on this device) against the padded single-device layer, and the local
   ragged_dot and tokamax layers against the same: output, statistics and gradients, in
   float32 (highest matmul precision) and bfloat16.
On CPU (no ragged all-to-all) the checks of 1 and the expert-parallel ones of 3 say "not
available". --tiny: small sizes (tests/test_bench.py runs it so on CPU).
--has-xla-flag FLAG: no checks; exit status 0 if this jaxlib knows the XLA flag, else 1.
Errors are relative: |a - b| / |b| over the whole array.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import mmap
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moetrain.model import experts as experts_lib
from moetrain.model import moe_ffn as moe_lib
from moetrain.parallel import mesh as mesh_lib, ragged
from ragged_emulation import emulated_ragged_all_to_all

RNG = np.random.default_rng()
RESULTS = []
CUDNN_FLAG = '--xla_gpu_experimental_use_ragged_dot_fusion=true'
TOKAMAX_IMPLS = ('mosaic', 'triton', 'xla')
# (tokens, d_model, d_expert) of the layer checks; the grouped checks take the layer's
# assignments (tokens x 2) plus a quarter of unused rows.
SIZES = dict(full=(512, 128, 256), tiny=(64, 16, 32))


def report(name, err, tol):
  ok = bool(np.isfinite(err) and err <= tol)
  RESULTS.append(ok)
  print(f"{'ok' if ok else 'FAIL':<5}{name:<64} rel err {err:.2e}  (tol {tol:.0e})", flush=True)


def not_available(name, reason):
  print(f"{'--':<5}{name:<64} not available: {reason}", flush=True)


@functools.cache
def tokamax_or_reason():
  """(the tokamax module, None), or (None, why it cannot be used)."""
  if importlib.util.find_spec('tokamax') is None:
    return None, "tokamax is not installed (pip install 'moetrain[gpu]')"
  try:
    return experts_lib.tokamax_module(), None
  except ImportError as e:
    return None, f'tokamax does not import: {e}'


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def kernels(hlo: str) -> str:
  """The custom-call targets and cuDNN fusions of a compiled HLO text."""
  found = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
  found |= set(re.findall(r'__cudnn\$\w+', hlo))
  return ', '.join(sorted(found)) or 'none (XLA fusions only)'


def check_collective(dtype):
  num, rows_in, rows_out, d = 8, 64, 80, 16
  sizes = RNG.integers(0, 6, num).astype(np.int32)
  sizes[RNG.random(num) < 0.25] = 0
  in_off = (np.cumsum(sizes + RNG.integers(0, 3, num)) - sizes).astype(np.int32)
  perm = RNG.permutation(num)  # output slices laid out in another order, with gaps too
  out_start = np.cumsum(sizes[perm] + RNG.integers(0, 3, num)) - sizes[perm]
  out_off = np.empty(num, np.int32); out_off[perm] = out_start
  assert in_off[-1] + sizes[-1] <= rows_in and out_off.max() + sizes.max() <= rows_out
  operand = jnp.asarray(RNG.standard_normal((rows_in, d)), dtype)
  output = jnp.asarray(RNG.standard_normal((rows_out, d)), dtype)
  cot = jnp.asarray(RNG.standard_normal((rows_out, d)), dtype)
  mesh = jax.make_mesh((1,), ('x',), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))

  def run(fn):
    def f(operand, output):
      return fn(operand, output, in_off, sizes, out_off, sizes, axis_name='x')
    def g(operand, output, cot):
      y, vjp = jax.vjp(f, operand, output)
      return (y, *vjp(cot))
    return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P('x'), out_specs=P('x')))(
        operand, output, cot)

  real, emulated = run(jax.lax.ragged_all_to_all), run(emulated_ragged_all_to_all)
  name = jnp.dtype(dtype).name
  report(f'ragged_all_to_all == emulation, values ({name})', rel(real[0], emulated[0]), 0)
  report(f'ragged_all_to_all == emulation, d operand ({name})', rel(real[1], emulated[1]), 0)


def grouped_inputs(t, d, f, e=8, top_k=2):
  """Rows grouped by expert as the layers see them: random group sizes (some empty) that
  sum to t*top_k, then t*top_k/4 unused rows; float32 x, weights and a cotangent that is
  zero on the unused rows (no gradient reaches them in the layer)."""
  used = t * top_k
  sizes = np.bincount(RNG.integers(0, e - 2, used), minlength=e)[RNG.permutation(e)]
  rows = used + used // 4
  x = RNG.standard_normal((rows, d)).astype(np.float32)
  ws = [(RNG.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))]
  cot = RNG.standard_normal((rows, d)).astype(np.float32)
  cot[used:] = 0
  return jnp.asarray(sizes, jnp.int32), used, x, ws, cot


def grouped_objective(swiglu, sizes, cot, dtype):
  """jit(value_and_grad) of sum(swiglu(x, *ws) * cot) over x and the three weights, with
  x and the weights cast to dtype."""
  def fn(x, *ws):
    y = swiglu(x.astype(dtype), *(w.astype(dtype) for w in ws), sizes)
    return jnp.sum(y.astype(jnp.float32) * cot), y
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))


def check_grouped(label, impl, inputs, dtype, tol, reference):
  """`grouped_swiglu` with grouped_dot impl `impl` against `reference` (the padded
  buffers' ((loss, y), grads)); 'not available' where it raises NotImplementedError."""
  sizes, used, x, ws, cot = inputs
  name = f'{label} == padded'
  what = f'({jnp.dtype(dtype).name})'
  fn = grouped_objective(functools.partial(experts_lib.grouped_swiglu, impl=impl), sizes, cot,
                         dtype)
  try:
    compiled = fn.lower(x, *ws).compile()
    (_, y), grads = compiled(x, *ws)
  except NotImplementedError as e:
    not_available(f'{label} {what}', str(e).splitlines()[0] if str(e) else 'NotImplementedError')
    return
  except Exception as e:  # pylint: disable=broad-except  # a path that breaks fails
    RESULTS.append(False)
    print(f"{'FAIL':<5}{label} {what}: {type(e).__name__}: {str(e).splitlines()[:1]}",
          flush=True)
    return
  (_, y_ref), grads_ref = reference
  report(f'{name}: output, used rows {what}', rel(y[:used], y_ref[:used]), tol)
  for w, g, g_ref in zip(('x', 'w_gate', 'w_up', 'w_down'), grads, grads_ref):
    report(f'{name}: d {w} {what}', rel(g, g_ref), tol)
  print(f"{'':<5}{label} {what} kernels: {kernels(compiled.as_text())}", flush=True)


def check_grouped_paths(sizes, only_xla=False, label_suffix=''):
  """Section 2 in float32 (highest precision) and bfloat16; `only_xla`: just
  jax.lax.ragged_dot (the cuDNN-flag subprocess)."""
  t, d, f = sizes
  inputs = grouped_inputs(t, d, f)
  group_sizes, _, x, ws, cot = inputs
  rows = x.shape[0]
  padded = functools.partial(experts_lib.padded_grouped_swiglu, capacity=rows)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    with jax.default_matmul_precision('highest' if dtype == jnp.float32 else 'default'):
      reference = grouped_objective(padded, group_sizes, cot, dtype)(x, *ws)
      check_grouped(f'jax.lax.ragged_dot{label_suffix}', 'xla', inputs, dtype, tol, reference)
      if only_xla:
        continue
      tokamax, reason = tokamax_or_reason()
      for impl in TOKAMAX_IMPLS:
        label = f"tokamax.ragged_dot implementation='{impl}'"
        if tokamax is None:
          not_available(f'{label} ({jnp.dtype(dtype).name})', reason)
          continue
        check_grouped(label, functools.partial(tokamax.ragged_dot, implementation=impl),
                      inputs, dtype, tol, reference)


def jaxlib_knows_flag(flag: str) -> bool:
  """Whether a jaxlib or jax plugin shared library holds the XLA flag's name."""
  name = flag.lstrip('-').split('=')[0].encode()
  packages = [importlib.util.find_spec(p) for p in ('jaxlib', 'jax_plugins')]
  dirs = [pathlib.Path(d) for p in packages if p for d in p.submodule_search_locations]
  for so in (so for d in dirs for so in d.rglob('*.so')):
    with open(so, 'rb') as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
      if data.find(name) >= 0:
        return True
  return False


def check_cudnn_flag(tiny: bool):
  """Section 2's jax.lax.ragged_dot checks again in a subprocess with CUDNN_FLAG set."""
  label = f'jax.lax.ragged_dot with {CUDNN_FLAG}'
  if not jaxlib_knows_flag(CUDNN_FLAG):
    not_available(label, f'jaxlib {jax.__version__} does not know the flag')
    return
  root = pathlib.Path(__file__).resolve().parents[1]
  path = [str(root), str(root / 'tests'), os.environ.get('PYTHONPATH', '')]
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {CUDNN_FLAG}".strip(),
             PYTHONPATH=os.pathsep.join(p for p in path if p))
  cmd = [sys.executable, __file__, '--cudnn-child'] + (['--tiny'] if tiny else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l[:5].strip() in ('ok', 'FAIL', '--', '')]
  for line in lines:
    print(line, flush=True)
    if line[:5].strip() in ('ok', 'FAIL'):
      RESULTS.append(line.startswith('ok'))
  if proc.returncode or not lines:
    RESULTS.append(False)
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    print(f"{'FAIL':<5}{label}: subprocess exited {proc.returncode}: {tail}", flush=True)


def spec(impl, top_k, grouped_matmul='xla'):
  return moe_lib.MoESpec(8, top_k, 'token_choice', 'softmax', 'topk_softmax', False, 1.0,
                         1.0, 1.0, 'position', True, impl, 0.0, 'global',
                         grouped_matmul=grouped_matmul)


def check_layer(dtype, top_k, tol, sizes):
  t, d, f = sizes
  e = 8
  x = RNG.standard_normal((t, d)).astype(np.float32)
  r = RNG.standard_normal((d, e)).astype(np.float32)
  ws = [(RNG.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))]
  cot = RNG.standard_normal((t, d)).astype(np.float32)

  def objective(spec, expert_axis=None):
    def fn(x, wg, wu, wd):
      kw = dict(spec=spec, seq_len=t // 8, train=True, dtype=dtype)
      if expert_axis:
        kw.update(expert_axis=expert_axis, batch_axes=mesh_lib.BATCH_AXES)
      y, stats = moe_lib.moe_ffn(x, r, wg, wu, wd, None, jax.random.key(0), **kw)
      return jnp.sum(y.astype(jnp.float32) * cot) + stats['balance_loss'], (y, stats)
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)

  # One device: the expert axis has size 1 (so out_specs=P() is exact), but the layer
  # still takes the expert-parallel path and its two ragged all-to-alls.
  mesh = jax.make_mesh((1, 1, 1), mesh_lib.AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def expert_parallel(impl, grouped_matmul='xla'):
    s = spec(impl, top_k, grouped_matmul)
    fn = jax.jit(jax.shard_map(objective(s, 'expert'), mesh=mesh,
                               in_specs=(P(mesh_lib.BATCH_AXES), P('expert'), P('expert'),
                                         P('expert')), out_specs=P(), check_vma=False))
    hlo = fn.lower(x, *ws).as_text()
    assert 'ragged_all_to_all' in hlo, f'{impl}: not the ragged expert-parallel path'
    if grouped_matmul == 'xla':
      assert ('ragged_dot' in hlo) == s.use_ragged(), f'{impl}: wrong expert kernel'
    return fn(x, *ws)

  local = lambda grouped_matmul: jax.jit(objective(spec('ragged', top_k, grouped_matmul)))(
      x, *ws)
  (_, (y_ref, stats_ref)), grads_ref = jax.jit(objective(spec('padded', top_k)))(x, *ws)
  name = f'{jnp.dtype(dtype).name}, k={top_k}'
  paths = [('EP ragged a2a + ragged_dot', lambda: expert_parallel('ragged')),
           ('EP ragged a2a + padded (auto)', lambda: expert_parallel('auto')),
           ('EP ragged a2a + tokamax', lambda: expert_parallel('auto', 'tokamax')),
           ('local ragged_dot', lambda: local('xla')),
           ('local tokamax', lambda: local('tokamax'))]
  for label, run in paths:
    if label.startswith('EP') and not ragged.backend_supports_ragged_all_to_all():
      not_available(f'{label} ({name})', f'the {jax.default_backend()} backend has no '
                    'ragged all-to-all')
      continue
    if 'tokamax' in label and tokamax_or_reason()[0] is None:
      not_available(f'{label} ({name})', tokamax_or_reason()[1])
      continue
    (_, (y, stats)), grads = run()
    report(f'{label} == padded: output ({name})', rel(y, y_ref), tol)
    report(f'{label} == padded: balance loss ({name})',
           rel(stats['balance_loss'], stats_ref['balance_loss']), 1e-6)
    for w, g, g_ref in zip(('x', 'w_gate', 'w_up', 'w_down'), grads, grads_ref):
      report(f'{label} == padded: d {w} ({name})', rel(g, g_ref), tol)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='small sizes (CPU tests)')
  parser.add_argument('--has-xla-flag', metavar='FLAG',
                      help='only say (exit status 0 or 1) whether this jaxlib knows FLAG')
  parser.add_argument('--cudnn-child', action='store_true', help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  if '--has-xla-flag' in argv[:-1]:  # its value starts with dashes: argparse wants '='
    i = argv.index('--has-xla-flag')
    argv[i:i + 2] = [f'--has-xla-flag={argv[i + 1]}']
  args = parser.parse_args(argv)
  if args.has_xla_flag:
    return 0 if jaxlib_knows_flag(args.has_xla_flag) else 1
  sizes = SIZES['tiny' if args.tiny else 'full']
  if args.cudnn_child:  # run by check_cudnn_flag with the flag in XLA_FLAGS
    check_grouped_paths(sizes, only_xla=True, label_suffix=' + cuDNN flag')
    return 0 if all(RESULTS) else 1
  print(f'jax {jax.__version__}, {jax.devices()}', flush=True)
  for dtype in (jnp.float32, jnp.bfloat16):
    if ragged.backend_supports_ragged_all_to_all():
      check_collective(dtype)
    else:
      not_available(f'ragged_all_to_all == emulation ({jnp.dtype(dtype).name})',
                    f'the {jax.default_backend()} backend has no ragged all-to-all')
  check_grouped_paths(sizes)
  check_cudnn_flag(args.tiny)
  with jax.default_matmul_precision('highest'):
    for k in (1, 2):
      check_layer(jnp.float32, k, 1e-5, sizes)
  check_layer(jnp.bfloat16, 2, 2e-2, sizes)
  print(f'{sum(RESULTS)}/{len(RESULTS)} checks passed', flush=True)
  return 0 if RESULTS and all(RESULTS) else 1


if __name__ == '__main__':
  sys.exit(main())
