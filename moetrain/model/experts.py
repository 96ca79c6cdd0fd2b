"""Expert executors: how one group of routed tokens reaches its experts and comes back.

An executor runs the experts of a MoE layer on the T tokens of one routing group once the
router has decided where they go; it never decides that itself. All executors have one
signature,

    executor(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD) -> y_TD float32 [T, D],

x_TD and the expert weights in the compute dtype, `r` a `moetrain.model.routing.Routing`,
and y_TD each token's expert outputs summed with their combine weights. Settings that are
not arrays (the expert mesh axis, a kernel) are bound with `functools.partial` by the one
place that picks an executor, `moetrain.model.moe_ffn.choose_executor`:

- `slot_buffers`: capacity buffers [E, C, D] filled by gathers from the routing's slot
  table, all-to-all over the expert mesh axis under expert parallelism (every router).
- `ragged_local`: dropless, assignments sorted by expert into grouped matmuls (`grouped_dot`).
- `ragged_exchange`: dropless under expert parallelism, the sorted assignments sent to
  their experts by ragged all-to-all (`moetrain.parallel.ragged`).
- `gathered`: dropless eval on a few tokens, each running its K experts with their
  weights gathered.
The dropless executors read the assignments (`Routing.expert_TK`, `weight_TK`) and need
no slots; `slot_buffers` reads the slots.

Shapes: T tokens, D model width, E experts (L = E / ep local ones), C slots per expert,
F expert hidden size, K choices per token, A = T * K assignments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moetrain import backend
from moetrain.model import slots
from moetrain.model.layers import scoped, swiglu
from moetrain.model.routing import Routing
from moetrain.parallel import ragged as ragged_lib


@scoped('dispatch')
def dispatch(x_TD: jax.Array, r: Routing) -> jax.Array:
  """Gathers each slot's token: [T, D] -> [E, C, D]; empty slots get zeros. With the
  token-choice table both ways, the gradient is a gather too (`slots.dispatch`)."""
  if r.slot_TK is not None:
    return slots.dispatch(x_TD, r.token_EC, r.slot_TK)
  return slots.with_zero_row(x_TD)[r.token_EC]


@scoped('combine')
def combine(y_ECD: jax.Array, r: Routing, num_tokens: int) -> jax.Array:
  """Adds each slot's output, times its weight, back to its token: [E, C, D] -> [T, D]
  float32. Token choice gathers each token's K slots (`slots.combine`); expert choice and
  soft routing (a token in up to E slots) scatter-add the slots into their tokens."""
  if r.slot_TK is not None:
    return slots.combine(y_ECD, r.weight_TK, r.slot_TK, r.token_EC, r.weight_EC)
  d = y_ECD.shape[-1]
  weighted = (y_ECD.astype(jnp.float32) * r.weight_EC[..., None]).reshape(-1, d)
  y_TD = jnp.zeros((num_tokens + 1, d), jnp.float32).at[r.token_EC.reshape(-1)].add(weighted)
  return y_TD[:num_tokens]


# Up to this many local experts, XLA:CPU runs them faster as separate 2-d GEMMs (a
# transposed operand folds into the GEMM) than as one batched einsum (which gets explicit
# transposes before the weight gradients): moe8 step -4% to -12% at d_model 512. For 64
# experts the loop is ~5x slower (bench/NOTES.md). GPU/TPU always take the batched form.
CPU_EXPERT_LOOP_MAX = 8


@scoped('experts')
def experts(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
  """SwiGLU expert e on its buffer row x_ECD[e]: [E, C, D] -> [E, C, D]."""
  num_experts = x_ECD.shape[0]
  if backend.name() == 'cpu' and num_experts <= CPU_EXPERT_LOOP_MAX:
    return jnp.stack([swiglu(x_ECD[e], w_gate_EDF[e], w_up_EDF[e], w_down_EFD[e],
                             'cd,df->cf', 'cf,fd->cd') for e in range(num_experts)])
  return swiglu(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, 'ecd,edf->ecf', 'ecf,efd->ecd')


def slot_buffers(x_TD, r: Routing, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                 expert_axis: str | None = None):
  """Capacity buffers: dispatch [T, D] -> [E, C, D], the batched experts, combine. Under
  expert parallelism (`expert_axis` a mesh axis of size ep; the weights hold this device's
  E / ep experts) slot block e travels to the device owning expert e by all-to-all, each
  device runs its experts on [E/ep, ep*C, D], and the outputs travel back. y [T, D] f32."""
  x_ECD = dispatch(x_TD, r)
  if expert_axis is not None:  # [E, C, D] -> [E/ep, ep*C, D]: slots travel to their expert.
    x_ECD = jax.lax.all_to_all(x_ECD, expert_axis, 0, 1, tiled=True)
  y_ECD = experts(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD)
  if expert_axis is not None:  # and back: [E/ep, ep*C, D] -> [E, C, D].
    y_ECD = jax.lax.all_to_all(y_ECD, expert_axis, 1, 0, tiled=True)
  return combine(y_ECD, r, x_TD.shape[0])


@scoped('dispatch')
def sort_by_expert(expert_TK, num_experts: int):
  """Assignments ordered by expert: token_A int32 [A] (A = T*K), the token of each,
  order_A [A] their positions in expert_TK.reshape(-1), and sizes_E int32 [E]."""
  expert_A = expert_TK.reshape(-1)
  order_A = jnp.argsort(expert_A, stable=True)
  sizes_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
  return order_A // expert_TK.shape[1], order_A, sizes_E


def tokamax_module():
  """The `tokamax` package (the gpu extra), imported on first use. Its options are absl
  flags that it parses from sys.argv unless parsed already, which fails under any other
  argument parser (pytest, argparse); outside an absl app they keep their defaults."""
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def grouped_dot(x_MK, w_GKN, sizes_G, impl='xla'):
  """Grouped matmul: row block g of x_MK [M, K] (sizes_G[g] consecutive rows) times
  w_GKN[g] -> [M, N] in x's dtype. impl 'xla': `jax.lax.ragged_dot`; 'tokamax':
  `tokamax.ragged_dot` with the kernel tokamax picks for the backend (Mosaic GPU, Triton,
  Mosaic TPU, else XLA's); or a function with ragged_dot's arguments (bench/gpu_check.py
  passes each tokamax implementation)."""
  if callable(impl):
    return impl(x_MK, w_GKN, sizes_G)
  if impl == 'tokamax':
    return tokamax_module().ragged_dot(x_MK, w_GKN, sizes_G)
  return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)


@scoped('experts')
def grouped_swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, sizes_E, impl='xla'):
  """SwiGLU of expert e on its consecutive sizes_E[e] rows of x_AD [A, D] -> [A, D]
  (rows past sum(sizes_E) are unused: zeros with jax.lax.ragged_dot, unspecified with
  other kernels); `impl` as in `grouped_dot`."""
  h_AF = (jax.nn.silu(grouped_dot(x_AD, w_gate_EDF, sizes_E, impl))
          * grouped_dot(x_AD, w_up_EDF, sizes_E, impl))
  return grouped_dot(h_AF, w_down_EFD, sizes_E, impl)


@scoped('combine')
def combine_sorted(y_AD, token_A, weight_A, num_tokens: int):
  """Adds each assignment's output times its weight to its token: [A, D] -> [T, D] f32."""
  return jnp.zeros((num_tokens, y_AD.shape[-1]), jnp.float32).at[token_A].add(
      y_AD.astype(jnp.float32) * weight_A[:, None])


def ragged_local(x_TD, r: Routing, w_gate_EDF, w_up_EDF, w_down_EFD, *, impl='xla'):
  """Dropless experts as grouped matmuls (`grouped_dot` with `impl`) over the assignments
  sorted by expert.

  Equals the padded computation; cheaper only where the grouped matmul has a kernel (XLA's
  ragged_dot on TPU; on GPU and CPU it was slower, see MoESpec.use_ragged).
  Returns y [T, D] float32.
  """
  token_A, order_A, sizes_E = sort_by_expert(r.expert_TK, w_gate_EDF.shape[0])
  with jax.named_scope('dispatch'):
    x_AD = x_TD[token_A]
  y_AD = grouped_swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, sizes_E, impl)
  return combine_sorted(y_AD, token_A, r.weight_TK.reshape(-1)[order_A], x_TD.shape[0])


@scoped('experts')
def gathered(x_TD, r: Routing, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Dropless experts for a few tokens: token t runs its K chosen experts with their
  weights gathered ([T, K, D, F]), so only T*K experts' weights are read. Equals the padded
  computation. Returns y [T, D] float32."""
  expert_TK = r.expert_TK
  h_TKF = (jax.nn.silu(jnp.einsum('td,tkdf->tkf', x_TD, w_gate_EDF[expert_TK]))
           * jnp.einsum('td,tkdf->tkf', x_TD, w_up_EDF[expert_TK]))
  y_TKD = jnp.einsum('tkf,tkfd->tkd', h_TKF, w_down_EFD[expert_TK])
  return jnp.einsum('tkd,tk->td', y_TKD.astype(jnp.float32), r.weight_TK)


def padded_grouped_swiglu(x_MD, w_gate_LDF, w_up_LDF, w_down_LFD, sizes_L, capacity: int):
  """`grouped_swiglu` through padded buffers: the rows of x_MD [M, D] (grouped by expert,
  sizes_L[l] rows for expert l, then unused rows) go to [L, capacity, D], the batched
  experts run, and each row takes its output back; unused rows give zeros."""
  num_rows = x_MD.shape[0]
  num_local = sizes_L.shape[0]
  with jax.named_scope('dispatch'):
    ends_L = jnp.cumsum(sizes_L)
    expert_M = jnp.searchsorted(ends_L, jnp.arange(num_rows), side='right')  # L: unused
    slot_M = jnp.arange(num_rows) - (ends_L - sizes_L)[jnp.minimum(expert_M, num_local - 1)]
    x_LCD = jnp.zeros((num_local, capacity, x_MD.shape[1]), x_MD.dtype).at[
        expert_M, slot_M].set(x_MD, mode='drop')
  y_LCD = experts(x_LCD, w_gate_LDF, w_up_LDF, w_down_LFD)
  with jax.named_scope('combine'):
    return y_LCD.at[expert_M, slot_M].get(mode='fill', fill_value=0)


def in_token_chunks(fn, x_TD, expert_TK, weight_TK, chunk: int):
  """fn(x [C, D], expert_CK, weight_CK) -> y [C, D] over consecutive chunks of `chunk`
  tokens (a `lax.scan` whose steps are rematerialized in the backward pass), so buffers
  that scale with the tokens exist for one chunk at a time. Dropless routing decides
  every token alone, so the result equals one call on all tokens. Returns y [T, D]."""
  num_chunks = x_TD.shape[0] // chunk
  split = lambda a: a.reshape(num_chunks, chunk, *a.shape[1:])
  step = jax.checkpoint(fn)
  _, y = jax.lax.scan(lambda _, xs: (None, step(*xs)), None,
                      (split(x_TD), split(expert_TK), split(weight_TK)))
  return y.reshape(x_TD.shape[0], -1)


def ragged_exchange(x_TD, r: Routing, w_gate_LDF, w_up_LDF, w_down_LFD, *,
                    expert_axis: str, grouped_matmul: str | None, chunk: int = 0):
  """Dropless experts split over `expert_axis` (L = E/ep per device), in chunks of `chunk`
  tokens (`in_token_chunks`; 0 or T: all at once). Returns y [T, D] f32."""
  def run(x_TD, expert_TK, weight_TK):
    return _ragged_exchange(x_TD, expert_TK, weight_TK, w_gate_LDF, w_up_LDF, w_down_LFD,
                            expert_axis=expert_axis, grouped_matmul=grouped_matmul)
  if 0 < chunk < x_TD.shape[0]:
    return in_token_chunks(run, x_TD, r.expert_TK, r.weight_TK, chunk)
  return run(x_TD, r.expert_TK, r.weight_TK)


def _ragged_exchange(x_TD, expert_TK, weight_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *,
                     expert_axis: str, grouped_matmul: str | None):
  """The sorted assignments travel to their experts and back by ragged all-to-all
  (moetrain.parallel.ragged). The local experts run as grouped matmuls (`grouped_dot`
  with impl `grouped_matmul`), or (None) on padded buffers of ep*T rows per expert.
  Returns y [T, D] f32."""
  num_tokens, top_k = expert_TK.shape
  num_devices = jax.lax.axis_size(expert_axis)
  num_local = w_gate_LDF.shape[0]
  token_A, order_A, sizes_E = sort_by_expert(expert_TK, num_devices * num_local)
  with jax.named_scope('dispatch'):
    counts_PE = jax.lax.all_gather(sizes_E, expert_axis)
    plan = ragged_lib.exchange_plan(counts_PE, jax.lax.axis_index(expert_axis))
    rows = ragged_lib.receive_rows(num_tokens, top_k, num_devices, num_local)
    x_MD = ragged_lib.to_experts(x_TD[token_A], plan, rows, expert_axis)
  weights = (w_gate_LDF, w_up_LDF, w_down_LFD)
  if grouped_matmul:
    y_MD = grouped_swiglu(x_MD, *weights, plan.group_sizes_L, grouped_matmul)
  else:
    y_MD = padded_grouped_swiglu(x_MD, *weights, plan.group_sizes_L, num_devices * num_tokens)
  with jax.named_scope('combine'):
    y_AD = ragged_lib.from_experts(y_MD, plan, token_A.shape[0], expert_axis)
  return combine_sorted(y_AD, token_A, weight_TK.reshape(-1)[order_A], num_tokens)
