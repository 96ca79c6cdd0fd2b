"""Routers as pure functions, and the router auxiliary losses.

Every router produces the same small description of where tokens go, `Routing`:
slot `c` of expert `e`'s buffer holds token `token_EC[e, c]` (the value `T`, one past the
last token, marks an empty slot), and that slot's expert output is added back to its
token times `weight_EC[e, c]`. Token choice, expert choice, soft (dense) routing and
dropless routing differ only in how they fill this table, so one dispatch and one combine
serve them all. Token choice without a capacity (the dropless executors that sort the
assignments by expert) gives only each token's experts and weights, `expert_TK` and
`weight_TK`. `route` runs the configured router; `router_losses` turns what it reports
(`RouterStats`) into the layer's losses and metrics. All router math is float32.

Shapes: T tokens, E experts, K choices per token, C slots per expert.
"""

from __future__ import annotations

import fractions
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moetrain.model.slots import slot_table


class Routing(NamedTuple):
  """Dispatch table of one MoE layer for one group of T tokens.

  token_EC:  int32 [E, C], the token in each slot; T marks an empty slot.
  weight_EC: float32 [E, C], combine weight of each slot (0 for empty slots).
  Token choice (one slot at most per assignment) also gives the table the other way round,
  which lets dispatch and combine move rows by gathers alone (`moetrain.model.slots`):
  slot_TK:   int32 [T, K], the flat slot e * C + c of each assignment; E * C: dropped.
  weight_TK: float32 [T, K], the combine weight of each assignment.
  expert_TK: int32 [T, K], the expert of each assignment (token choice).
  Token choice without a capacity has no slots: token_EC, weight_EC and slot_TK are None.
  """
  token_EC: jax.Array | None
  weight_EC: jax.Array | None
  slot_TK: jax.Array | None = None
  weight_TK: jax.Array | None = None
  expert_TK: jax.Array | None = None


class RouterStats(NamedTuple):
  """What the losses and metrics need to know about one routing decision.

  probs_TE:  float32 [T, E], router probabilities (sigmoid scores normalized over E).
  assign_TE: float32 [T, E], 1 where a token chose an expert, before capacity.
  kept:      float32 [], what found a place: assignments that found a slot (token
             choice), tokens that at least one expert took (expert choice, soft).
  wanted:    float32 [], what asked for a place: T * K assignments (token choice), T tokens
             (expert choice, soft); dropped_frac is 1 - kept / wanted.
  logits_TE: float32 [T, E], the router logits (z-loss, max logit).
  """
  probs_TE: jax.Array
  assign_TE: jax.Array
  kept: jax.Array
  wanted: jax.Array
  logits_TE: jax.Array


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / experts), at least 1, at most tokens.

  Exact: the factor is read as the decimal it prints as (1.1 is 11/10, not the binary
  float just above it), so cf=1.1, T=50, k=2, E=10 gives 11 slots, not 12.
  """
  exact = fractions.Fraction(repr(float(factor))) * num_tokens * top_k / num_experts
  return max(1, min(num_tokens, math.ceil(exact)))


def router_logits(x_TD: jax.Array, router_DE: jax.Array, jitter: float = 0.0,
                  key: jax.Array | None = None) -> jax.Array:
  """float32 logits [T, E] = x @ router, both in float32. `jitter` > 0 first multiplies
  the router's input by noise U(1 - jitter, 1 + jitter) drawn from `key` (training)."""
  x_TD = x_TD.astype(jnp.float32)
  if jitter > 0:
    x_TD = x_TD * jax.random.uniform(key, x_TD.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  return x_TD @ router_DE.astype(jnp.float32)


def top_k_gates(logits_TE: jax.Array, top_k: int, *, gate: str = 'softmax',
                softmax_order: str = 'softmax_topk', renormalize: bool = False,
                routed_scaling: float = 1.0, bias_E: jax.Array | None = None):
  """Token-choice selection: each token picks its top-k experts.

  gate='softmax', softmax_order='softmax_topk': softmax over all E experts, then the k
    largest probabilities are the weights (Switch/GShard); `renormalize` divides them by
    their sum.
  gate='softmax', softmax_order='topk_softmax': top-k of the logits, then a softmax over
    those k (Mixtral); the weights always sum to one.
  gate='sigmoid': sigmoid scores, top-k, weights normalized over the k (DeepSeek-V3).
  `bias_E` (aux-loss-free balancing) is added to the scores for the selection only; the
  weights never see it. The scores are the softmax probabilities over all E experts for
  both softmax orders (topk_softmax selects by probability + bias, then takes the softmax
  of the selected logits) and the sigmoid scores for gate='sigmoid'.
  `routed_scaling` multiplies the final weights.

  Returns expert_TK int32 [T, K], weight_TK float32 [T, K], probs_TE float32 [T, E].
  """
  logits_TE = logits_TE.astype(jnp.float32)
  if gate == 'softmax':
    scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    probs_TE = scores_TE
  else:
    scores_TE = jax.nn.sigmoid(logits_TE)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  select_TE = scores_TE if bias_E is None else scores_TE + bias_E
  _, expert_TK = jax.lax.top_k(select_TE, top_k)
  if gate == 'softmax' and softmax_order == 'topk_softmax':
    weight_TK = jax.nn.softmax(jnp.take_along_axis(logits_TE, expert_TK, axis=-1), axis=-1)
  else:
    weight_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=-1)
    if renormalize or gate == 'sigmoid':
      weight_TK = weight_TK / jnp.sum(weight_TK, axis=-1, keepdims=True)
  return expert_TK.astype(jnp.int32), weight_TK * routed_scaling, probs_TE


def priority_order(weight_TK: jax.Array, drop_order: str) -> jax.Array:
  """Order in which tokens claim expert slots, int32 [T].

  'position': token order (GShard). 'probability': tokens by descending top-1 weight,
  ties by position (batch-prioritized routing, Switch / V-MoE). In both, all first
  choices are placed before any second choice, and so on (choice-major).
  """
  num_tokens = weight_TK.shape[0]
  if drop_order == 'position':
    return jnp.arange(num_tokens, dtype=jnp.int32)
  return jnp.argsort(-weight_TK[:, 0], stable=True).astype(jnp.int32)


def slot_positions(expert_A: jax.Array, num_experts: int) -> jax.Array:
  """For assignments in priority order, how many earlier ones chose the same expert.

  expert_A int32 [A] -> position int32 [A]. A stable sort by expert id, so the cost is
  A log A whatever the number of experts.
  """
  num = expert_A.shape[0]
  order_A = jnp.argsort(expert_A, stable=True)
  counts_E = jnp.bincount(expert_A, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_A = jnp.arange(num, dtype=jnp.int32) - starts_E[expert_A[order_A]].astype(jnp.int32)
  return jnp.zeros(num, jnp.int32).at[order_A].set(rank_A)


def capacity_routing(expert_TK: jax.Array, weight_TK: jax.Array, num_experts: int,
                     capacity: int, drop_order: str = 'position', keep_TK=None):
  """Places token-choice assignments into [E, C] slots; overflow is dropped.

  `keep_TK` (float32 [T, K], optional) multiplies the slots' combine weights after the
  slots are placed (an ablation: `ablation_keep`), so it never changes which tokens drop.
  Returns (Routing, kept) where kept is the number of assignments that found a slot.
  """
  num_tokens, top_k = expert_TK.shape
  order_T = priority_order(weight_TK, drop_order)
  expert_A = expert_TK[order_T].T.reshape(-1)  # choice-major: [K * T]
  combine_TK = weight_TK if keep_TK is None else weight_TK * keep_TK
  weight_A = combine_TK[order_T].T.reshape(-1)
  token_A = jnp.tile(order_T, top_k)
  pos_A = slot_positions(expert_A, num_experts)
  keep_A = pos_A < capacity
  flat_A = jnp.where(keep_A, expert_A * capacity + pos_A, num_experts * capacity)
  token_EC = jnp.full(num_experts * capacity, num_tokens, jnp.int32)
  token_EC = token_EC.at[flat_A].set(token_A, mode='drop')
  weight_EC = jnp.zeros(num_experts * capacity, jnp.float32)
  weight_EC = weight_EC.at[flat_A].set(weight_A, mode='drop')
  routing = Routing(token_EC.reshape(num_experts, capacity),
                    weight_EC.reshape(num_experts, capacity),
                    slot_table(flat_A, order_T), combine_TK, expert_TK)
  return routing, jnp.sum(keep_A).astype(jnp.float32)


def expert_choice_routing(logits_TE: jax.Array, capacity: int) -> Routing:
  """Expert choice (Zhou et al. 2022): softmax over experts per token, then each expert
  takes the `capacity` tokens with the highest probability (ties: lower position). A token
  may be taken by 0..E experts."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weight_EC, token_EC = jax.lax.top_k(probs_TE.T, capacity)
  return Routing(token_EC.astype(jnp.int32), weight_EC)


def soft_routing(logits_TE: jax.Array) -> Routing:
  """Dense ("soft") MoE: every expert runs on every token, weighted by the softmax."""
  num_tokens, num_experts = logits_TE.shape
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  token_EC = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32),
                              (num_experts, num_tokens))
  return Routing(token_EC, probs_TE.T)


def ablation_keep(expert_TK: jax.Array, num_experts: int, remove_experts: tuple = (),
                  remove_choices: tuple = ()) -> jax.Array:
  """float32 [T, K]: 0 for the assignments an ablation removes, 1 for the others.

  Removed: every assignment to an expert in `remove_experts` (ids) and every choice whose
  rank is in `remove_choices` (0 = each token's top-1 choice). A removed assignment keeps
  its expert slot (routing and capacity drops are unchanged) and gets combine weight 0;
  the token's other assignments keep their weights (nothing is renormalized), so the
  residual carries what the removed expert would have added. Removing expert i this way
  gives exactly the output of a model whose expert i has all-zero weights.
  """
  return keep_mask(num_experts, remove_experts)[expert_TK] * keep_mask(
      expert_TK.shape[1], remove_choices)[None]


def keep_mask(size: int, removed: tuple) -> jax.Array:
  """float32 [size]: 0 at the indices in `removed`, 1 elsewhere."""
  return jnp.ones(size, jnp.float32).at[jnp.asarray(removed, jnp.int32)].set(0.0)


def assignment_mask(expert_TK: jax.Array, num_experts: int) -> jax.Array:
  """float32 [T, E]: 1 where the token chose the expert (any of its K choices)."""
  return jnp.sum(jax.nn.one_hot(expert_TK, num_experts, dtype=jnp.float32), axis=1)


def token_choice(logits_TE: jax.Array, top_k: int, *, capacity: int | None,
                 drop_order: str = 'position', bias_E: jax.Array | None = None,
                 remove_experts: tuple = (), remove_choices: tuple = (), **gates):
  """Token-choice routing: each token's top-k experts (`top_k_gates` with the selection
  keywords `gates`: gate, softmax_order, renormalize, routed_scaling), ablated by
  `remove_experts` / `remove_choices` (`ablation_keep`), then placed into `capacity` slots
  per expert (`capacity_routing`, in `drop_order`); with capacity None nothing is placed
  or dropped, and the Routing holds only expert_TK and weight_TK.

  Returns (Routing, RouterStats).
  """
  num_tokens, num_experts = logits_TE.shape
  expert_TK, weight_TK, probs_TE = top_k_gates(logits_TE, top_k, bias_E=bias_E, **gates)
  keep_TK = (ablation_keep(expert_TK, num_experts, remove_experts, remove_choices)
             if remove_experts or remove_choices else None)
  wanted = jnp.float32(num_tokens * top_k)
  if capacity is None:
    combine_TK = weight_TK if keep_TK is None else weight_TK * keep_TK
    routing, kept = Routing(None, None, weight_TK=combine_TK, expert_TK=expert_TK), wanted
  else:
    routing, kept = capacity_routing(expert_TK, weight_TK, num_experts, capacity,
                                     drop_order, keep_TK)
  return routing, RouterStats(probs_TE, assignment_mask(expert_TK, num_experts), kept,
                              wanted, logits_TE)


def route(logits_TE: jax.Array, *, router: str, top_k: int, capacity: int | None,
          drop_order: str = 'position', bias_E: jax.Array | None = None,
          remove_experts: tuple = (), remove_choices: tuple = (), **gates):
  """Runs the configured router on one group of tokens.

  Token choice is `token_choice` (capacity None: no slots, for the dropless executors
  that sort assignments by expert; `gates` are its selection keywords). Expert choice and
  soft routing fill `capacity` slots per expert (soft: every token in every expert);
  `remove_experts` zeroes the weights of those experts' slots. Returns (Routing,
  RouterStats); for expert choice and soft routing `assign_TE` records which experts took
  each token, and a token no expert took counts as dropped.
  """
  num_tokens, num_experts = logits_TE.shape
  logits_TE = logits_TE.astype(jnp.float32)
  if router == 'token_choice':
    return token_choice(logits_TE, top_k, capacity=capacity, drop_order=drop_order,
                        bias_E=bias_E, remove_experts=remove_experts,
                        remove_choices=remove_choices, **gates)
  if router == 'expert_choice':
    routing = expert_choice_routing(logits_TE, capacity)
  elif router == 'soft':
    routing = soft_routing(logits_TE)
  else:
    raise ValueError(f'unknown router {router!r}')
  if remove_experts:
    keep_E1 = keep_mask(num_experts, remove_experts)[:, None]
    routing = routing._replace(weight_EC=routing.weight_EC * keep_E1)
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  taken_TE = jnp.zeros((num_tokens + 1, num_experts), jnp.float32).at[
      routing.token_EC, jnp.arange(num_experts)[:, None]].set(1.0)[:num_tokens]
  kept = jnp.sum(jnp.max(taken_TE, axis=1))  # tokens that at least one expert took.
  return routing, RouterStats(probs_TE, taken_TE, kept, jnp.float32(num_tokens), logits_TE)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den is 0 (e.g. the share of a sequence's assignments per
  expert when expert choice gave that sequence none)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def balance_loss(frac_GE: jax.Array, mean_prob_GE: jax.Array) -> jax.Array:
  """Switch load-balancing loss E * sum_i f_i * P_i, averaged over groups G.

  frac_GE: fraction of the group's assignments that chose expert i (treated as constant);
  mean_prob_GE: mean router probability of expert i over the group's tokens. Equals 1 when
  both are uniform. A group is a micro-batch, the global batch, or one sequence.
  """
  num_experts = frac_GE.shape[-1]
  frac_GE = jax.lax.stop_gradient(frac_GE)
  return num_experts * jnp.mean(jnp.sum(frac_GE * mean_prob_GE, axis=-1))


def z_loss(logits_TE: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def router_entropy(probs_TE: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy (nats) of the router distribution."""
  return -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1))


def _psum(x, axes: tuple):
  return jax.lax.psum(x, axes) if axes else x


def scoped_balance_loss(stats: RouterStats, scope: str, seq_len: int,
                        batch_axes: tuple = ()) -> jax.Array:
  """`balance_loss` of one group of T tokens (one device's under shard_map, whose tokens
  are split over the mesh axes `batch_axes`) over the groups `scope` names:
  'micro_batch': each device's tokens, the loss averaged over devices; 'global': the
  statistics summed over all devices first (the whole batch's loss); 'sequence': each
  sequence of `seq_len` tokens, averaged over sequences."""
  num_tokens, num_experts = stats.probs_TE.shape
  if scope == 'sequence':
    assign_GLE = stats.assign_TE.reshape(-1, seq_len, num_experts)
    probs_GLE = stats.probs_TE.reshape(-1, seq_len, num_experts)
    counts_GE = jnp.sum(assign_GLE, axis=1)
    balance = balance_loss(safe_divide(counts_GE, jnp.sum(counts_GE, -1, keepdims=True)),
                           jnp.mean(probs_GLE, axis=1))
    return _psum(balance, batch_axes) / _psum(1.0, batch_axes)
  axes = batch_axes if scope == 'global' else ()
  counts_E = _psum(jnp.sum(stats.assign_TE, axis=0), axes)
  sum_prob_E = _psum(jnp.sum(stats.probs_TE, axis=0), axes)
  tokens = _psum(jnp.float32(num_tokens), axes)
  frac_E = safe_divide(counts_E, jnp.sum(counts_E))
  balance = balance_loss(frac_E[None], (sum_prob_E / tokens)[None])
  if scope == 'micro_batch':  # mean of the per-group losses
    balance = _psum(balance, batch_axes) / _psum(1.0, batch_axes)
  return balance


def router_losses(stats: RouterStats, *, balance_scope: str, seq_len: int,
                  batch_axes: tuple = ()) -> dict:
  """The losses and metrics of one MoE layer from its routing statistics on one group of
  tokens (split over the mesh axes `batch_axes`; the metrics cover all of them).

  Returns float32 scalars balance_loss (`scoped_balance_loss`), z_loss, dropped_frac
  (1 - kept / wanted), router_entropy, max_logit, and load_E [E] (each expert's share of
  the assignments before capacity). Only the two losses carry gradients.
  """
  num_tokens = stats.probs_TE.shape[0]
  sg = jax.lax.stop_gradient
  all_counts_E = _psum(jnp.sum(stats.assign_TE, axis=0), batch_axes)
  all_tokens = _psum(jnp.float32(num_tokens), batch_axes)
  max_logit = sg(jnp.max(stats.logits_TE))
  return dict(
      balance_loss=scoped_balance_loss(stats, balance_scope, seq_len, batch_axes),
      z_loss=_psum(z_loss(stats.logits_TE) * num_tokens, batch_axes) / all_tokens,
      load_E=all_counts_E / jnp.sum(all_counts_E),
      dropped_frac=1.0 - _psum(stats.kept, batch_axes) / _psum(stats.wanted, batch_axes),
      router_entropy=sg(_psum(router_entropy(stats.probs_TE) * num_tokens, batch_axes)
                        / all_tokens),
      max_logit=jax.lax.pmax(max_logit, batch_axes) if batch_axes else max_logit,
  )


def bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean_load - load);
  the mean is over the last axis (experts), so [..., E] stacks of layers work too."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)
