"""The MoE feed-forward as pure functions of arrays: router -> dispatch -> experts -> combine.

`moe_ffn` runs on one routing group of tokens. `moetrain.parallel.dispatch` runs it per
device inside `jax.shard_map`, where a routing group is the tokens of one device and tokens
cross to their experts by all-to-all over the `expert` mesh axis; on one device it is called
directly and the group is the whole batch. The nnx layer is `moetrain.model.moe.MoE`.

Shapes: T tokens in the group, D model width, E experts, C slots per expert, F expert
hidden size, K choices per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moetrain import backend, config as config_lib
from moetrain.model import routing, slots
from moetrain.model.layers import scoped, swiglu
from moetrain.parallel import ragged

@dataclasses.dataclass(frozen=True)
class MoESpec:
  """Static settings of a MoE layer (hashable, so jit can close over it)."""
  num_experts: int
  top_k: int
  router: str
  gate: str
  softmax_order: str
  renormalize: bool
  routed_scaling: float
  capacity_factor: float
  eval_capacity_factor: float
  drop_order: str
  dropless: bool
  dropless_impl: str
  jitter: float
  balance_scope: str
  expert_chunk: int = 0  # dropless expert parallelism: tokens exchanged per chunk.
  # Ablation (`routing.ablation_keep`): expert ids and choice ranks (0 = top-1) whose
  # assignments get combine weight 0.
  remove_experts: tuple = ()
  remove_choices: tuple = ()
  grouped_matmul: str = 'xla'  # the grouped-matmul kernel of the ragged path (`grouped_dot`).

  @classmethod
  def from_config(cls, model_cfg, layer: int | None = None) -> 'MoESpec':
    """The spec of MoE layer `layer` (its index in the model: the experts
    `model.moe.remove_experts` removes there)."""
    e = model_cfg.moe
    removed = config_lib.removed_experts(e.remove_experts)
    return cls(model_cfg.num_experts, e.top_k, e.router, e.gate, e.softmax_order,
               e.renormalize, e.routed_scaling, e.capacity_factor, e.eval_capacity_factor,
               e.drop_order, e.dropless, e.dropless_impl, e.jitter, e.balance_scope,
               e.expert_chunk,
               tuple(sorted({i for l, i in removed if l is None or l == layer})),
               tuple(rank - 1 for rank in config_lib.parse_ints(e.remove_choices)),
               e.grouped_matmul)

  def ablates(self) -> bool:
    return bool(self.remove_experts or self.remove_choices)

  def capacity(self, num_tokens: int, train: bool) -> int:
    """Slots per expert for a routing group of `num_tokens` tokens."""
    if self.router == 'soft' or self.dropless_token_choice():
      return num_tokens
    factor = self.capacity_factor if train else self.eval_capacity_factor
    return config_lib.capacity(num_tokens, self.num_experts, self.top_k, factor)

  def dropless_token_choice(self) -> bool:
    return self.router == 'token_choice' and self.dropless

  def _dropless_choice(self, auto: bool) -> bool:
    """dropless_impl as a bool: 'ragged' True, 'padded' False, 'auto' `auto`."""
    if not self.dropless_token_choice():
      return False
    return auto if self.dropless_impl == 'auto' else self.dropless_impl == 'ragged'

  def use_ragged(self) -> bool:
    """Dropless experts as ragged_dot grouped matmuls (`grouped_dot`) instead of padded
    buffers.

    `auto` takes them on TPU, and on every backend with grouped_matmul='tokamax' (the user
    asked for its kernels); not with XLA's ragged_dot on GPU: on an H100 (jax 0.11.2) it
    made the train step 1.6-1.8x slower than padded buffers of capacity T per expert, even
    with 64 experts where the padded buffers do 32x the expert FLOPs (bench/NOTES.md).
    """
    return self._dropless_choice(backend.name() == 'tpu' or self.grouped_matmul == 'tokamax')

  def gathers(self, num_tokens: int, train: bool) -> bool:
    """Dropless eval on fewer assignments than experts (decoding a few new tokens): each
    token runs its K experts with their weights gathered, which reads T*K experts'
    weights instead of all E (`gathered_experts`). Only without expert parallelism."""
    return (not train and self.dropless_token_choice()
            and num_tokens * self.top_k < self.num_experts)

  def use_ragged_exchange(self) -> bool:
    """Under expert parallelism, dropless tokens travel by `jax.lax.ragged_all_to_all`
    (only the routed tokens) instead of a padded all-to-all (E/K times the bytes).
    `auto` takes it where the backend has it (GPU, TPU)."""
    return self._dropless_choice(ragged.backend_supports_ragged_all_to_all())


def token_choices(x_TD: jax.Array, router_DE: jax.Array, bias_E, spec: MoESpec) -> jax.Array:
  """The K experts the router ranks highest for each token, int32 [T, K] (best first):
  for token choice exactly the experts the layer sends it to before capacity (selection
  bias included, no jitter: eval); for expert choice and soft routing the top-K of the
  router's probabilities. What analyses read (`moetrain.analysis`)."""
  logits_TE = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
  if spec.router != 'token_choice':
    return jax.lax.top_k(logits_TE, spec.top_k)[1].astype(jnp.int32)
  return routing.top_k_gates(logits_TE, spec.top_k, gate=spec.gate,
                             softmax_order=spec.softmax_order, bias_E=bias_E)[0]


@scoped('dispatch')
def dispatch(x_TD: jax.Array, r: routing.Routing) -> jax.Array:
  """Gathers each slot's token: [T, D] -> [E, C, D]; empty slots get zeros. With the
  token-choice table both ways, the gradient is a gather too (`slots.dispatch`)."""
  if r.slot_TK is not None:
    return slots.dispatch(x_TD, r.token_EC, r.slot_TK)
  return slots.with_zero_row(x_TD)[r.token_EC]


@scoped('combine')
def combine(y_ECD: jax.Array, r: routing.Routing, num_tokens: int) -> jax.Array:
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


def ragged_experts(x_TD, expert_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
                   impl: str = 'xla'):
  """Dropless experts as grouped matmuls (`grouped_dot` with `impl`) over assignments
  sorted by expert.

  Equals the padded computation; cheaper only where the grouped matmul has a kernel (XLA's
  ragged_dot on TPU; on GPU and CPU it was slower, see MoESpec.use_ragged).
  Returns y [T, D] float32.
  """
  token_A, order_A, sizes_E = sort_by_expert(expert_TK, w_gate_EDF.shape[0])
  with jax.named_scope('dispatch'):
    x_AD = x_TD[token_A]
  y_AD = grouped_swiglu(x_AD, w_gate_EDF, w_up_EDF, w_down_EFD, sizes_E, impl)
  return combine_sorted(y_AD, token_A, weight_TK.reshape(-1)[order_A], x_TD.shape[0])


@scoped('experts')
def gathered_experts(x_TD, expert_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Dropless experts for a few tokens: token t runs its K chosen experts with their
  weights gathered ([T, K, D, F]), so only T*K experts' weights are read. Equals the padded
  computation. Returns y [T, D] float32."""
  h_TKF = (jax.nn.silu(jnp.einsum('td,tkdf->tkf', x_TD, w_gate_EDF[expert_TK]))
           * jnp.einsum('td,tkdf->tkf', x_TD, w_up_EDF[expert_TK]))
  y_TKD = jnp.einsum('tkf,tkfd->tkd', h_TKF, w_down_EFD[expert_TK])
  return jnp.einsum('tkd,tk->td', y_TKD.astype(jnp.float32), weight_TK)


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


def ragged_expert_parallel(x_TD, expert_TK, weight_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *,
                           num_experts: int, expert_axis: str, grouped_matmul: str | None):
  """Dropless experts split over `expert_axis` (L = E/ep per device): the sorted
  assignments travel to their experts and back by ragged all-to-all
  (moetrain.parallel.ragged). The local experts run as grouped matmuls (`grouped_dot`
  with impl `grouped_matmul`), or (None) on padded buffers of ep*T rows per expert.
  Returns y [T, D] f32."""
  num_tokens, top_k = expert_TK.shape
  num_devices = jax.lax.axis_size(expert_axis)
  token_A, order_A, sizes_E = sort_by_expert(expert_TK, num_experts)
  with jax.named_scope('dispatch'):
    counts_PE = jax.lax.all_gather(sizes_E, expert_axis)
    plan = ragged.exchange_plan(counts_PE, jax.lax.axis_index(expert_axis))
    rows = ragged.receive_rows(num_tokens, top_k, num_devices, w_gate_LDF.shape[0])
    x_MD = ragged.to_experts(x_TD[token_A], plan, rows, expert_axis)
  weights = (w_gate_LDF, w_up_LDF, w_down_LFD)
  if grouped_matmul:
    y_MD = grouped_swiglu(x_MD, *weights, plan.group_sizes_L, grouped_matmul)
  else:
    y_MD = padded_grouped_swiglu(x_MD, *weights, plan.group_sizes_L, num_devices * num_tokens)
  with jax.named_scope('combine'):
    y_AD = ragged.from_experts(y_MD, plan, token_A.shape[0], expert_axis)
  return combine_sorted(y_AD, token_A, weight_TK.reshape(-1)[order_A], num_tokens)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def moe_ffn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, jitter_key, *,
            spec: MoESpec, seq_len: int, train: bool, dtype,
            expert_axis: str | None = None, batch_axes: tuple = ()):
  """Routed experts on one group of T tokens (one device's tokens under shard_map).

  Expert weights hold this device's E / ep experts when `expert_axis` names a mesh axis
  (ep its size), else all E. `batch_axes` are the mesh axes the tokens are split over:
  global-batch balance statistics and all reported metrics are summed over them.

  Returns y_TD (dtype) and a dict of float32 statistics: balance_loss, z_loss,
  load_E (fraction of assignments per expert, whole batch), dropped_frac (assignments
  that found no slot; for expert choice, tokens no expert took), router_entropy, max_logit.
  """
  num_tokens = x_TD.shape[0]
  num_experts = spec.num_experts
  with jax.named_scope('router'):
    x_router = x_TD.astype(jnp.float32)
    if train and spec.jitter > 0:
      x_router = x_router * jax.random.uniform(jitter_key, x_router.shape, jnp.float32,
                                               1.0 - spec.jitter, 1.0 + spec.jitter)
    logits_TE = x_router @ router_DE.astype(jnp.float32)
  weights = [w.astype(dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
  x_TD = x_TD.astype(dtype)
  ragged_exchange = expert_axis is not None and spec.use_ragged_exchange()
  gather = expert_axis is None and spec.gathers(num_tokens, train)
  local_ragged = expert_axis is None and spec.use_ragged()
  if local_ragged or ragged_exchange or gather:
    with jax.named_scope('router'):
      expert_TK, weight_TK, probs_TE = routing.top_k_gates(
          logits_TE, spec.top_k, gate=spec.gate, softmax_order=spec.softmax_order,
          renormalize=spec.renormalize, routed_scaling=spec.routed_scaling, bias_E=bias_E)
      if spec.ablates():
        weight_TK = weight_TK * routing.ablation_keep(
            expert_TK, num_experts, spec.remove_experts, spec.remove_choices)
      stats = routing.RouterStats(probs_TE, routing.assignment_mask(expert_TK, num_experts),
                                  jnp.float32(expert_TK.size), jnp.float32(expert_TK.size))
    if ragged_exchange:
      run = lambda x, e, w: ragged_expert_parallel(
          x, e, w, *weights, num_experts=num_experts, expert_axis=expert_axis,
          grouped_matmul=spec.grouped_matmul if spec.use_ragged() else None)
      if 0 < spec.expert_chunk < num_tokens:
        y_TD = in_token_chunks(run, x_TD, expert_TK, weight_TK, spec.expert_chunk)
      else:
        y_TD = run(x_TD, expert_TK, weight_TK)
    elif gather:
      y_TD = gathered_experts(x_TD, expert_TK, weight_TK, *weights)
    else:  # local_ragged
      y_TD = ragged_experts(x_TD, expert_TK, weight_TK, *weights, spec.grouped_matmul)
  else:
    with jax.named_scope('router'):
      r, stats = routing.route(
          logits_TE, router=spec.router, top_k=spec.top_k,
          capacity=spec.capacity(num_tokens, train), gate=spec.gate,
          softmax_order=spec.softmax_order, renormalize=spec.renormalize,
          routed_scaling=spec.routed_scaling, drop_order=spec.drop_order, bias_E=bias_E,
          remove_experts=spec.remove_experts, remove_choices=spec.remove_choices)
    x_ECD = dispatch(x_TD, r)
    if expert_axis is not None:  # [E, C, D] -> [E/ep, ep*C, D]: slots travel to their expert.
      x_ECD = jax.lax.all_to_all(x_ECD, expert_axis, 0, 1, tiled=True)
    y_ECD = experts(x_ECD, *weights)
    if expert_axis is not None:  # and back: [E/ep, ep*C, D] -> [E, C, D].
      y_ECD = jax.lax.all_to_all(y_ECD, expert_axis, 1, 0, tiled=True)
    y_TD = combine(y_ECD, r, num_tokens)

  counts_E = jnp.sum(stats.assign_TE, axis=0)
  sum_prob_E = jnp.sum(stats.probs_TE, axis=0)
  if spec.balance_scope == 'sequence':
    assign_GLE = stats.assign_TE.reshape(-1, seq_len, num_experts)
    probs_GLE = stats.probs_TE.reshape(-1, seq_len, num_experts)
    counts_GE = jnp.sum(assign_GLE, axis=1)
    balance = routing.balance_loss(
        routing.safe_divide(counts_GE, jnp.sum(counts_GE, -1, keepdims=True)),
        jnp.mean(probs_GLE, axis=1))
    balance = _psum(balance, batch_axes) / _psum(1.0, batch_axes)
  else:
    axes = batch_axes if spec.balance_scope == 'global' else ()
    tot_counts_E, tot_prob_E = _psum(counts_E, axes), _psum(sum_prob_E, axes)
    tokens = _psum(jnp.float32(num_tokens), axes)
    frac_E = routing.safe_divide(tot_counts_E, jnp.sum(tot_counts_E))
    balance = routing.balance_loss(frac_E[None], (tot_prob_E / tokens)[None])
    if spec.balance_scope == 'micro_batch':  # mean of the per-group losses
      balance = _psum(balance, batch_axes) / _psum(1.0, batch_axes)

  # Metrics only: no gradient flows through them.
  sg = jax.lax.stop_gradient
  all_counts_E = _psum(counts_E, batch_axes)
  all_tokens = _psum(jnp.float32(num_tokens), batch_axes)
  assignments = jnp.sum(all_counts_E)
  max_logit = sg(jnp.max(logits_TE))
  out = dict(
      balance_loss=balance,
      z_loss=_psum(routing.z_loss(logits_TE) * num_tokens, batch_axes) / all_tokens,
      load_E=all_counts_E / assignments,
      dropped_frac=1.0 - _psum(stats.kept, batch_axes) / _psum(stats.wanted, batch_axes),
      router_entropy=sg(_psum(routing.router_entropy(stats.probs_TE) * num_tokens,
                              batch_axes) / all_tokens),
      max_logit=jax.lax.pmax(max_logit, batch_axes) if batch_axes else max_logit,
  )
  return y_TD, out
