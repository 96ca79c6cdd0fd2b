"""The MoE feed-forward as pure functions of arrays: route -> execute -> losses.

`moe_ffn` runs on one routing group of tokens: the router decides where each token goes
(`moetrain.model.routing.route`), an executor runs the experts on that decision
(`moetrain.model.experts`, picked in one place: `choose_executor`), and the router losses
and metrics follow from the routing statistics (`routing.router_losses`).
`moetrain.model.moe_parallel` runs it per device inside `jax.shard_map`, where a routing
group is the tokens of one device and tokens cross to their experts over the `expert` mesh
axis; on one device it is called directly and the group is the whole batch. The nnx layer
is `moetrain.model.moe.MoE`.

Shapes: T tokens in the group, D model width, E experts, C slots per expert, F expert
hidden size, K choices per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moetrain import backend, config as config_lib
from moetrain.model import experts as experts_lib, routing
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

  def capacity(self, num_tokens: int, train: bool) -> int:
    """Slots per expert for a routing group of `num_tokens` tokens."""
    if self.router == 'soft' or self.dropless_token_choice():
      return num_tokens
    factor = self.capacity_factor if train else self.eval_capacity_factor
    return routing.capacity(num_tokens, self.num_experts, self.top_k, factor)

  def gates(self) -> dict:
    """The selection keywords of `routing.top_k_gates` (and of `routing.route`)."""
    return dict(gate=self.gate, softmax_order=self.softmax_order,
                renormalize=self.renormalize, routed_scaling=self.routed_scaling)

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
    weights instead of all E (`experts.gathered`). Only without expert parallelism."""
    return (not train and self.dropless_token_choice()
            and num_tokens * self.top_k < self.num_experts)

  def use_ragged_exchange(self) -> bool:
    """Under expert parallelism, dropless tokens travel by `jax.lax.ragged_all_to_all`
    (only the routed tokens) instead of a padded all-to-all (E/K times the bytes).
    `auto` takes it where the backend has it (GPU, TPU)."""
    return self._dropless_choice(ragged.backend_supports_ragged_all_to_all())


def layer_specs(model_cfg) -> dict[int, MoESpec]:
  """The spec of every MoE layer, {layer index: MoESpec}, built once per model from
  `model_cfg` (the layers differ only in the experts `model.moe.remove_experts` removes
  in them)."""
  e = model_cfg.moe
  removed = config_lib.removed_experts(e.remove_experts)
  spec = MoESpec(model_cfg.num_experts, e.top_k, e.router, e.gate, e.softmax_order,
                 e.renormalize, e.routed_scaling, e.capacity_factor, e.eval_capacity_factor,
                 e.drop_order, e.dropless, e.dropless_impl, e.jitter, e.balance_scope,
                 e.expert_chunk,
                 remove_choices=tuple(rank - 1 for rank in config_lib.parse_ints(
                     e.remove_choices)),
                 grouped_matmul=e.grouped_matmul)
  return {layer: dataclasses.replace(spec, remove_experts=tuple(sorted(
      {i for l, i in removed if l is None or l == layer})))
          for layer in config_lib.moe_layers(model_cfg)}


def token_choices(x_TD: jax.Array, router_DE: jax.Array, bias_E, spec: MoESpec) -> jax.Array:
  """The K experts the router ranks highest for each token, int32 [T, K] (best first):
  for token choice exactly the experts the layer sends it to before capacity (selection
  bias included, no jitter: eval); for expert choice and soft routing the top-K of the
  router's probabilities. What analyses read (`moetrain.analysis`)."""
  logits_TE = routing.router_logits(x_TD, router_DE)
  if spec.router != 'token_choice':
    return jax.lax.top_k(logits_TE, spec.top_k)[1].astype(jnp.int32)
  return routing.top_k_gates(logits_TE, spec.top_k, bias_E=bias_E, **spec.gates())[0]


def choose_executor(spec: MoESpec, num_tokens: int, train: bool, expert_axis: str | None):
  """How the experts of a layer run on a group of `num_tokens` tokens (the one place that
  picks an executor of `moetrain.model.experts`). Returns (executor, capacity): the
  executor with its settings bound, and the slots per expert the routing must fill for it,
  None for the dropless executors that take the assignments sorted by expert."""
  if expert_axis is not None and spec.use_ragged_exchange():
    return functools.partial(
        experts_lib.ragged_exchange, expert_axis=expert_axis, chunk=spec.expert_chunk,
        grouped_matmul=spec.grouped_matmul if spec.use_ragged() else None), None
  if expert_axis is None and spec.gathers(num_tokens, train):
    return experts_lib.gathered, None
  if expert_axis is None and spec.use_ragged():
    return functools.partial(experts_lib.ragged_local, impl=spec.grouped_matmul), None
  return (functools.partial(experts_lib.slot_buffers, expert_axis=expert_axis),
          spec.capacity(num_tokens, train))


def moe_ffn(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E, jitter_key, *,
            spec: MoESpec, seq_len: int, train: bool, dtype,
            expert_axis: str | None = None, batch_axes: tuple = ()):
  """Routed experts on one group of T tokens (one device's tokens under shard_map).

  Expert weights hold this device's E / ep experts when `expert_axis` names a mesh axis
  (ep its size), else all E. `batch_axes` are the mesh axes the tokens are split over:
  global-batch balance statistics and all reported metrics are summed over them.

  Returns y_TD float32 and a dict of float32 statistics (`routing.router_losses`):
  balance_loss, z_loss, load_E (fraction of assignments per expert, whole batch),
  dropped_frac (assignments that found no slot; for expert choice, tokens no expert took),
  router_entropy, max_logit.
  """
  execute, capacity = choose_executor(spec, x_TD.shape[0], train, expert_axis)
  with jax.named_scope('router'):
    logits_TE = routing.router_logits(x_TD, router_DE, spec.jitter if train else 0.0,
                                      jitter_key)
    r, stats = routing.route(
        logits_TE, router=spec.router, top_k=spec.top_k, capacity=capacity,
        drop_order=spec.drop_order, bias_E=bias_E, remove_experts=spec.remove_experts,
        remove_choices=spec.remove_choices, **spec.gates())
  weights = [w.astype(dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
  y_TD = execute(x_TD.astype(dtype), r, *weights)
  return y_TD, routing.router_losses(stats, balance_scope=spec.balance_scope,
                                     seq_len=seq_len, batch_axes=batch_axes)
