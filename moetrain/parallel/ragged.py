"""Dropless expert parallelism with `jax.lax.ragged_all_to_all`: only routed tokens travel.

Each device sorts its T*K assignments by expert, so the rows for the experts of device j
are one contiguous block, and sends slice e (the rows for expert e) to the device owning
e. The receiver lays its buffer out grouped by local expert, and within an expert by
sending device, so `jax.lax.ragged_dot` runs the local experts on it directly. The same
slices travel back the other way. Every offset comes from one all_gather of the
per-expert counts [ep, E] (E int32 per device).

The receive buffer is static and sized for the worst case, every token of every device
routed to this device (ep * T * min(K, E/ep) rows); only `sum(group_sizes)` rows of it
are filled, sent and computed on. XLA:CPU has no ragged all-to-all
(`backend_supports_ragged_all_to_all`), so on CPU dropless under expert parallelism
uses the padded all-to-all (moetrain.model.moe).

Shapes: P devices on the expert axis (ep), E experts, L = E/P local experts, A = T*K
assignments, M receive-buffer rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moetrain import backend

# The collective, looked up at trace time so that tests can substitute an emulation on
# CPU (XLA:CPU raises UNIMPLEMENTED for ragged-all-to-all).
ragged_all_to_all = jax.lax.ragged_all_to_all


def backend_supports_ragged_all_to_all() -> bool:
  """Whether the target backend (moetrain.backend) has ragged-all-to-all (GPU, TPU)."""
  return backend.name() in ('gpu', 'tpu')


class ExchangePlan(NamedTuple):
  """Offsets and sizes of one device's two ragged all-to-alls.

  Forward (tokens to experts), indexed by global expert e:
    input_offsets_E, send_sizes_E: this device's rows for expert e in its sorted array.
    output_offsets_E: where those rows land in the receive buffer of e's device.
  Receiving, indexed by k = p*L + l (sender p, local expert l):
    recv_offsets_K, recv_sizes_K: where sender p's rows for local expert l lie here.
    source_offsets_K: where those rows came from in sender p's sorted array.
  group_sizes_L: rows per local expert in the receive buffer (its groups, in order).
  """
  input_offsets_E: jax.Array
  send_sizes_E: jax.Array
  output_offsets_E: jax.Array
  recv_offsets_K: jax.Array
  recv_sizes_K: jax.Array
  source_offsets_K: jax.Array
  group_sizes_L: jax.Array


def _exclusive_cumsum(x, axis):
  return jnp.cumsum(x, axis=axis) - x


def exchange_plan(counts_PE: jax.Array, me) -> ExchangePlan:
  """The plan of device `me` (its index on the expert axis, may be traced).

  counts_PE int32 [P, E]: how many assignments device p routes to expert e (every
  device holds the same matrix). Expert e lives on device e // L.
  """
  num_devices, num_experts = counts_PE.shape
  local = num_experts // num_devices
  total_E = jnp.sum(counts_PE, axis=0)
  # Receive buffers are grouped by local expert, then by sender.
  group_start_E = _exclusive_cumsum(total_E.reshape(num_devices, local), 1).reshape(-1)
  landing_PE = group_start_E[None, :] + _exclusive_cumsum(counts_PE, 0)
  source_PE = _exclusive_cumsum(counts_PE, 1)  # row offsets in each sender's sorted array

  def mine(a_PE):  # the columns of this device's experts, flattened to k = p*L + l
    return jax.lax.dynamic_slice_in_dim(a_PE, me * local, local, axis=1).reshape(-1)

  return ExchangePlan(
      input_offsets_E=jax.lax.dynamic_index_in_dim(source_PE, me, 0, keepdims=False),
      send_sizes_E=jax.lax.dynamic_index_in_dim(counts_PE, me, 0, keepdims=False),
      output_offsets_E=jax.lax.dynamic_index_in_dim(landing_PE, me, 0, keepdims=False),
      recv_offsets_K=mine(landing_PE),
      recv_sizes_K=mine(counts_PE),
      source_offsets_K=mine(source_PE),
      group_sizes_L=jax.lax.dynamic_slice_in_dim(total_E, me * local, local))


def to_experts(x_AD, plan: ExchangePlan, rows: int, axis: str):
  """Sends each expert's rows to its device: [A, D] sorted by expert -> [M, D] grouped by
  local expert (rows past sum(group_sizes_L) are zero)."""
  out = jnp.zeros((rows, x_AD.shape[1]), x_AD.dtype)
  return ragged_all_to_all(x_AD, out, plan.input_offsets_E, plan.send_sizes_E,
                           plan.output_offsets_E, plan.recv_sizes_K, axis_name=axis)


def from_experts(y_MD, plan: ExchangePlan, num_rows: int, axis: str):
  """The reverse trip: [M, D] -> [A, D], each row back in its sender's sorted order."""
  out = jnp.zeros((num_rows, y_MD.shape[1]), y_MD.dtype)
  return ragged_all_to_all(y_MD, out, plan.recv_offsets_K, plan.recv_sizes_K,
                           plan.source_offsets_K, plan.send_sizes_E, axis_name=axis)


def receive_rows(num_tokens: int, top_k: int, num_devices: int, local_experts: int) -> int:
  """Static receive-buffer rows: every token of every device routed here (no drops)."""
  return num_devices * num_tokens * min(top_k, local_experts)
