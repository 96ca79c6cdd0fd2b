"""Checks that need a GPU (or TPU): the ragged code paths, real collectives, bf16.

  PYTHONPATH=.:tests python bench/gpu_check.py      # exits 1 if any check fails

1. `jax.lax.ragged_all_to_all` against tests/ragged_emulation.py (the emulation the CPU
   tests use), on a random plan of E slices with gaps: values and the operand's gradient.
2. The dropless layer under expert parallelism (ragged all-to-all, then ragged_dot or, as
   `auto` picks on GPU, padded expert buffers; run inside shard_map with the expert axis
   on this device) against the padded single-device layer, and the local ragged_dot layer
   against the same: output, statistics and gradients, in float32 (highest matmul
   precision) and bfloat16.
Errors are relative: |a - b| / |b| over the whole array.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moetrain.model import moe_ffn as moe_lib
from moetrain.parallel import mesh as mesh_lib
from ragged_emulation import emulated_ragged_all_to_all

RNG = np.random.default_rng()
RESULTS = []


def report(name, err, tol):
  ok = bool(np.isfinite(err) and err <= tol)
  RESULTS.append(ok)
  print(f"{'ok' if ok else 'FAIL':<5}{name:<64} rel err {err:.2e}  (tol {tol:.0e})", flush=True)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


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


def spec(impl, top_k):
  return moe_lib.MoESpec(8, top_k, 'token_choice', 'softmax', 'topk_softmax', False, 1.0,
                         1.0, 1.0, 'position', True, impl, 0.0, 'global')


def check_layer(dtype, top_k, tol):
  t, d, f, e = 512, 128, 256, 8
  x = RNG.standard_normal((t, d)).astype(np.float32)
  r = RNG.standard_normal((d, e)).astype(np.float32)
  ws = [(RNG.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))]
  cot = RNG.standard_normal((t, d)).astype(np.float32)

  def objective(spec, expert_axis=None):
    def fn(x, wg, wu, wd):
      kw = dict(spec=spec, seq_len=64, train=True, dtype=dtype)
      if expert_axis:
        kw.update(expert_axis=expert_axis, batch_axes=mesh_lib.BATCH_AXES)
      y, stats = moe_lib.moe_ffn(x, r, wg, wu, wd, None, jax.random.key(0), **kw)
      return jnp.sum(y.astype(jnp.float32) * cot) + stats['balance_loss'], (y, stats)
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)

  # One device: the expert axis has size 1 (so out_specs=P() is exact), but the layer
  # still takes the expert-parallel path and its two ragged all-to-alls.
  mesh = jax.make_mesh((1, 1, 1), mesh_lib.AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def expert_parallel(impl):
    fn = jax.jit(jax.shard_map(objective(spec(impl, top_k), 'expert'), mesh=mesh,
                               in_specs=(P(mesh_lib.BATCH_AXES), P('expert'), P('expert'),
                                         P('expert')), out_specs=P(), check_vma=False))
    hlo = fn.lower(x, *ws).as_text()
    assert 'ragged_all_to_all' in hlo, f'{impl}: not the ragged expert-parallel path'
    assert ('ragged_dot' in hlo) == (impl == 'ragged'), f'{impl}: wrong expert kernel'
    return fn(x, *ws)

  (_, (y_ref, stats_ref)), grads_ref = jax.jit(objective(spec('padded', top_k)))(x, *ws)
  name = f'{jnp.dtype(dtype).name}, k={top_k}'
  for label, got in (('EP ragged a2a + ragged_dot', expert_parallel('ragged')),
                     ('EP ragged a2a + padded (auto)', expert_parallel('auto')),
                     ('local ragged_dot', jax.jit(objective(spec('ragged', top_k)))(x, *ws))):
    (_, (y, stats)), grads = got
    report(f'{label} == padded: output ({name})', rel(y, y_ref), tol)
    report(f'{label} == padded: balance loss ({name})',
           rel(stats['balance_loss'], stats_ref['balance_loss']), 1e-6)
    for w, g, g_ref in zip(('x', 'w_gate', 'w_up', 'w_down'), grads, grads_ref):
      report(f'{label} == padded: d {w} ({name})', rel(g, g_ref), tol)


def main():
  print(f'jax {jax.__version__}, {jax.devices()}', flush=True)
  for dtype in (jnp.float32, jnp.bfloat16):
    check_collective(dtype)
  with jax.default_matmul_precision('highest'):
    for k in (1, 2):
      check_layer(jnp.float32, k, 1e-5)
  check_layer(jnp.bfloat16, 2, 2e-2)
  print(f'{sum(RESULTS)}/{len(RESULTS)} checks passed', flush=True)
  return 0 if all(RESULTS) else 1


if __name__ == '__main__':
  sys.exit(main())
