"""The MoE layer on the current mesh: `moe_ffn` per device under `jax.shard_map`.

Inside a mesh with an `expert` axis of size ep, each device routes its own tokens (the
capacity rule holds per device group) and its executor sends them to the devices owning
their experts: capacity buffers [E, C, D] by `jax.lax.all_to_all`, each device running its
E/ep experts on [E/ep, ep*C, D]; or, for dropless token choice on GPU/TPU, only the routed
tokens by ragged all-to-all (`moetrain.model.experts`, `moetrain.parallel.ragged`).
Without a mesh (or on one device) the same function runs directly on the whole batch.

Under FSDP (an `fsdp` axis of size > 1) the expert weights arrive split over `fsdp` as
well (along d_model, the rule table of moetrain.parallel.mesh); each device all-gathers
its slice over `fsdp` just before use and casts it to the compute dtype, so a layer's
full local experts exist only while it runs. The gather's transpose reduce-scatters the
weight gradients.
"""

from __future__ import annotations

import functools
import logging

import jax
from jax.sharding import PartitionSpec as P

from moetrain.model.moe_ffn import MoESpec, moe_ffn
from moetrain.parallel import mesh as mesh_lib
from moetrain.parallel.mesh import BATCH_AXES

# Logical axes of the expert weight stacks (the parameters of moetrain.model.moe.MoE).
EXPERT_IN_AXES = ('expert', 'embed', 'mlp')  # w_gate, w_up [E, D, F]
EXPERT_OUT_AXES = ('expert', 'mlp', 'embed')  # w_down [E, F, D]


@functools.cache
def log_dropless_choice(expert_parallel: bool, ragged_exchange: bool,
                        grouped_matmul: str | None):
  """Says once per process which dropless implementation the layers use (grouped_matmul:
  the `model.moe.grouped_matmul` of the grouped matmuls, None for padded buffers)."""
  kernel = {'xla': 'jax.lax', 'tokamax': 'tokamax'}.get(grouped_matmul)
  compute = (f'{kernel}.ragged_dot grouped matmuls' if grouped_matmul else
             'padded expert buffers (capacity = every token that can reach an expert)')
  if not expert_parallel:
    how = compute
  elif ragged_exchange:
    how = f'ragged all-to-all of the routed tokens (jax.lax.ragged_all_to_all), {compute}'
  else:
    how = ('padded all-to-all (buffers sized for every local token to one expert; this '
           f'backend has no ragged all-to-all), {compute}')
  logging.warning('dropless MoE%s: %s', ' under expert parallelism' if expert_parallel else '',
                  how)


def run_moe_ffn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, rng, *,
                spec: MoESpec, seq_len: int, train: bool, dtype):
  """`moe_ffn` on the current mesh: per device under shard_map, or directly.

  x_TD [T, D] holds the whole batch's tokens (sharded over data x expert under a mesh).
  Returns y_TD [T, D] and the layer statistics (identical on every device).
  """
  mesh = mesh_lib.current_mesh()
  kwargs = dict(spec=spec, seq_len=seq_len, train=train, dtype=dtype)
  if spec.dropless_token_choice():
    log_dropless_choice(mesh is not None and mesh.shape['expert'] > 1,
                        spec.use_ragged_exchange(),
                        spec.grouped_matmul if spec.use_ragged() else None)
  if mesh is None:
    return moe_ffn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, rng, **kwargs)

  expert_axis = 'expert' if mesh.shape['expert'] > 1 else None
  w_in, w_out = (mesh_lib.logical_to_spec(a, w.shape, mesh.shape)
                 for a, w in ((EXPERT_IN_AXES, w_gate_EDF), (EXPERT_OUT_AXES, w_down_EFD)))

  def local(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXES))
    # Gathered, then cast: a cast before the gather would be hoisted by XLA out of a loop
    # over scanned layers as one cast of every layer's experts (a second copy of them).
    w_gate_EDF, w_up_EDF = (mesh_lib.gather_fsdp(w, w_in).astype(dtype)
                            for w in (w_gate_EDF, w_up_EDF))
    w_down_EFD = mesh_lib.gather_fsdp(w_down_EFD, w_out).astype(dtype)
    return moe_ffn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, rng,
                   expert_axis=expert_axis, batch_axes=BATCH_AXES, **kwargs)

  bias_spec = None if bias_E is None else P()
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(BATCH_AXES), P(), w_in, w_in, w_out, bias_spec, P()),
                     out_specs=(P(BATCH_AXES), P()))
  return fn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, rng)
