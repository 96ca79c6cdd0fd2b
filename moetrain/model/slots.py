"""Moving rows between tokens and expert slots with gathers only, forward and backward.

Token choice with a capacity puts each of a token's K assignments in at most one slot of
the [E, C] expert buffers, so the table runs both ways: `token_EC` (the token in each slot,
T for an empty one) and `slot_TK` (the flat slot e * C + c of each assignment, E * C for a
dropped one). Dispatch gathers tokens into slots and combine gathers slots back into
tokens; their gradients are gathers through the other table. Automatic differentiation
would turn each gather's gradient into a scatter-add over the row-sized arrays (atomic adds
on a GPU, a serial loop on a CPU); the combine that expert choice and soft routing need (a
token in up to E slots, `experts.combine`) scatters in its forward pass too.

Shapes: T tokens, D model width, E experts, C slots per expert, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def with_zero_row(x_ND):
  """[N, D] -> [N + 1, D]: index N (an empty slot / a dropped assignment) reads zeros."""
  return jnp.concatenate([x_ND, jnp.zeros_like(x_ND[:1])], axis=0)


def _gather_sum(rows_ND, index_TK):
  """Sum over k of rows_ND[index_TK[t, k]] in float32 ([T, D]); index N gives zeros."""
  picked_TKD = with_zero_row(rows_ND)[index_TK]
  return jnp.sum(picked_TKD.astype(jnp.float32), axis=1)


@jax.custom_vjp
def dispatch(x_TD, token_EC, slot_TK):
  """Each slot's token: [T, D] -> [E, C, D] (zeros in empty slots)."""
  return with_zero_row(x_TD)[token_EC]


def _dispatch_fwd(x_TD, token_EC, slot_TK):
  return dispatch(x_TD, token_EC, slot_TK), slot_TK


def _dispatch_bwd(slot_TK, g_ECD):
  g_TD = _gather_sum(g_ECD.reshape(-1, g_ECD.shape[-1]), slot_TK).astype(g_ECD.dtype)
  return g_TD, None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(y_ECD, weight_TK, slot_TK, token_EC, weight_EC):
  """Each token's slots' outputs times their weights, summed: [E, C, D] -> [T, D] float32.

  weight_TK float32 [T, K]: the combine weight of each assignment (its slot's weight;
  dropped assignments read the zero row whatever their weight). weight_EC [E, C]: the same
  weights by slot (`Routing.weight_EC`), read by the gradient only; the weights' gradient
  flows through weight_TK."""
  y_ND = y_ECD.reshape(-1, y_ECD.shape[-1])
  picked_TKD = with_zero_row(y_ND)[slot_TK].astype(jnp.float32)
  return jnp.einsum('tkd,tk->td', picked_TKD, weight_TK)


def _combine_fwd(y_ECD, weight_TK, slot_TK, token_EC, weight_EC):
  return (combine(y_ECD, weight_TK, slot_TK, token_EC, weight_EC),
          (y_ECD, slot_TK, token_EC, weight_EC))


def _combine_bwd(res, g_TD):
  y_ECD, slot_TK, token_EC, weight_EC = res
  g_pad = with_zero_row(g_TD.astype(jnp.float32))
  g_y = (g_pad[token_EC] * weight_EC[..., None]).astype(y_ECD.dtype)
  y_ND = with_zero_row(y_ECD.reshape(-1, y_ECD.shape[-1]))
  g_weight_TK = jnp.einsum('tkd,td->tk', y_ND[slot_TK].astype(jnp.float32),
                           g_TD.astype(jnp.float32))
  return g_y, g_weight_TK, None, None, None


combine.defvjp(_combine_fwd, _combine_bwd)


def slot_table(flat_A, order_T):
  """slot_TK int32 [T, K] from the flat slot of every assignment in claim order.

  flat_A int32 [K * T]: choice-major over tokens in priority order order_T [T] (assignment
  k * T + i is choice k of token order_T[i]); E * C marks a dropped assignment."""
  num_tokens = order_T.shape[0]
  slot_TK = flat_A.reshape(-1, num_tokens).T
  return jnp.zeros_like(slot_TK).at[order_T].set(slot_TK, unique_indices=True)
