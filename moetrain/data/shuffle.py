"""Keyed pseudo-random functions of integers: a 64-bit hash, uniforms, and a permutation of
[0, n) that maps any index in O(1) time and memory (a Feistel network with cycle walking).

Everything is exact uint64 arithmetic in NumPy, so results are the same on every machine and
for every array shape; the data split, the row order of each epoch and the mixture offsets
are built from these.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
FEISTEL_ROUNDS = 6


def mix64(x) -> np.ndarray:
  """splitmix64's finalizer of x + golden ratio: uint64 -> uint64, a bijection whose output
  bits each depend on every input bit."""
  with np.errstate(over='ignore'):  # wrapping is the point; numpy scalars would warn.
    z = np.asarray(x, np.uint64) + np.uint64(GOLDEN64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_ints(*values: int) -> int:
  """A 64-bit key from a sequence of Python ints (any sign), e.g. (seed, component, epoch)."""
  h = np.uint64(0)
  for v in values:
    h = mix64(h ^ np.uint64(int(v) & MASK64))
  return int(h)


def uniform(key: int, index) -> np.ndarray:
  """float64 [...] in [0, 1): a keyed uniform per integer index (53 random bits each)."""
  h = mix64(mix64(np.asarray(index, np.uint64)) ^ np.uint64(key & MASK64))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
  """A balanced Feistel network on (2 * half_bits)-bit values: a bijection of that range."""
  mask = np.uint64((1 << half_bits) - 1)
  left, right = x >> np.uint64(half_bits), x & mask
  for key in keys:
    left, right = right, left ^ (mix64(right ^ key) & mask)
  return (left << np.uint64(half_bits)) | right


def permute(index, n: int, key: int) -> np.ndarray:
  """int64 [...]: the positions of `index` (ints in [0, n)) under a keyed permutation of
  [0, n). O(1) memory: a Feistel bijection of the smallest even-bit range holding n, applied
  again while a value falls outside [0, n) (cycle walking; under 4 passes on average)."""
  half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  keys = mix64(np.uint64(key & MASK64) ^ np.arange(FEISTEL_ROUNDS, dtype=np.uint64))
  x = _feistel(np.array(index, np.uint64, ndmin=1), half_bits, keys)
  outside = x >= np.uint64(n)
  while outside.any():
    x[outside] = _feistel(x[outside], half_bits, keys)
    outside = x >= np.uint64(n)
  return x.astype(np.int64).reshape(np.shape(index))
