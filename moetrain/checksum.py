"""Checksums of arrays that do not depend on how the arrays are sharded: a checkpoint saved
on one mesh is verified after restoring onto another.

An array's checksum is two uint32 sums over its elements of a mixed hash of (element bits,
flat position). Integer addition is exact and associative, so any reduction order (any
sharding, any number of processes) gives the same value; changing one element always
changes the first sum (the per-position mix is a bijection of the bits), and damage to
several elements cancels in both sums only by chance (about 2^-64). Computed on the
devices, where the arrays live, with `device_checksums`; `numpy_checksum` is the same
function on a host array (and the reference the tests check the device version against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_M1, _M2, _GOLDEN, _SEED1, _SEED2 = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 0x3C6EF372, 0xA54FF53A


def _fmix(x, xp):
  """murmur3's 32-bit finalizer (a bijection of uint32) on an array of module `xp`."""
  u32 = xp.uint32
  x = x ^ (x >> u32(16))
  x = x * u32(_M1)
  x = x ^ (x >> u32(13))
  x = x * u32(_M2)
  return x ^ (x >> u32(16))


def _sums(bits, xp, total):
  """The two uint32 checksum sums of flat uint32 element bits (positions 0..n-1)."""
  u32 = xp.uint32
  key = _fmix(xp.arange(bits.shape[0], dtype=u32) * u32(_GOLDEN) + u32(_SEED1), xp)
  first = _fmix(bits ^ key, xp)
  second = _fmix((bits + key) * u32(_GOLDEN) ^ u32(_SEED2), xp)
  return total(first), total(second)


def _numpy_bits(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a).reshape(-1)
  size = a.dtype.itemsize
  if size == 8:
    pairs = a.view(np.uint32).reshape(-1, 2)
    return pairs[:, 0] ^ _fmix(pairs[:, 1] ^ np.uint32(_SEED2), np)
  return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[size]).astype(np.uint32)


def numpy_checksum(a) -> list[int]:
  """[sum1, sum2] of a host array."""
  total = lambda x: int(np.sum(x, dtype=np.uint64) & np.uint64(0xFFFFFFFF))
  with np.errstate(over='ignore'):
    return list(_sums(_numpy_bits(np.asarray(a)), np, total))


def _device_bits(x: jax.Array) -> jax.Array:
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:
    pairs = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return pairs[:, 0] ^ _fmix(pairs[:, 1] ^ jnp.uint32(_SEED2), jnp)
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _device_sums(flat: dict) -> dict:
  total = lambda x: jnp.sum(x, dtype=jnp.uint32)
  return {k: _sums(_device_bits(v), jnp, total) for k, v in flat.items()}


def device_checksums(flat: dict) -> dict:
  """{name: [sum1, sum2]} of a flat dict of jax arrays (any sharding, any processes)."""
  sums = _device_sums(flat)
  # Scalars are replicated: every process reads them from its own first shard.
  return {k: [int(np.asarray(s.addressable_data(0))) for s in pair]
          for k, pair in sums.items()}
