"""`jax.lax.ragged_all_to_all` emulated with all_gather and scatters, for backends without it.

XLA:CPU raises UNIMPLEMENTED for ragged-all-to-all, so the CPU tests run the ragged
expert-parallel layer with this emulation (tests/test_ragged.py checks it against the
collective's documented semantics) and bench/gpu_check.py compares it with the real
collective on a GPU. Imports only jax, so that the GPU check can use it.
"""

import jax
import jax.numpy as jnp


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` from all_gather and scatters (differentiable, any backend).

  Receiver m writes, for every sender p and slice l of its block, recv_sizes[p*L + l] rows
  of p's operand starting at p's input_offsets[m*L + l], at p's output_offsets[m*L + l].
  """
  num_devices = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  per_device = input_offsets.shape[0] // num_devices
  operands = jax.lax.all_gather(operand, axis_name)
  starts, dests = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, output_offsets))
  rows = jnp.arange(operand.shape[0])
  result = output
  for p in range(num_devices):
    for l in range(per_device):
      k = me * per_device + l
      start, dest, size = starts[p, k], dests[p, k], recv_sizes[p * per_device + l]
      inside = (rows >= start) & (rows < start + size)
      target = jnp.where(inside, dest + rows - start, output.shape[0])  # out of range: drop
      result = result.at[target].set(operands[p], mode='drop')
  return result
