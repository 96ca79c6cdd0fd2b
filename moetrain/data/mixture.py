"""Mixtures: which component (prepared directory) each row of each batch comes from.

Rows are numbered globally, n = step * batch_size + slot. The weights are applied as a
chain of two-way splits: component 0 takes row n when floor((m + 1) p_0 + b_0) exceeds
floor(m p_0 + b_0) with m = n, p_0 = w_0 and a seeded offset b_0 in [0, 1); the rows it
leaves are renumbered m - floor(m p_0 + b_0) and split the same way between component 1
(p_1 = w_1 / (w_1 + ... + w_{K-1})) and the rest, and so on. So among any first n rows
each component has within K - 1 rows of w_c * n of them, the rows a component receives are
numbered 0, 1, 2, ... (its own row stream, shuffled per epoch by the loader), and both the
choice and the counts are closed-form functions of (seed, n): nothing to replay on resume.
"""

from __future__ import annotations

import numpy as np

from moetrain.data import shuffle

MIXTURE_TAG = 0x313A  # keys the offsets apart from the other uses of the seed.


def split_probabilities(weights) -> np.ndarray:
  """float64 [K - 1]: p_c = w_c / (w_c + ... + w_{K-1}), the share component c takes of the
  rows the earlier components leave."""
  w = np.asarray(weights, np.float64)
  return (w / np.cumsum(w[::-1])[::-1])[:-1]


def offsets(num_components: int, seed: int) -> np.ndarray:
  """float64 [K - 1]: the seeded offsets b_c in [0, 1) of the two-way splits."""
  return shuffle.uniform(shuffle.hash_ints(seed, MIXTURE_TAG), np.arange(num_components - 1))


def assign(rows, weights, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(component, position) int64 [...] of global rows `rows`: which component each row
  comes from and how many rows that component gave before it."""
  m = np.array(rows, np.int64, ndmin=1)
  component = np.full(m.shape, len(weights) - 1, np.int64)
  position = np.zeros(m.shape, np.int64)
  open_ = np.ones(m.shape, bool)
  for c, (p, b) in enumerate(zip(split_probabilities(weights), offsets(len(weights), seed))):
    before = np.floor(m * p + b).astype(np.int64)
    take = open_ & (np.floor((m + 1) * p + b).astype(np.int64) > before)
    component[take], position[take] = c, before[take]
    open_ &= ~take
    m = np.where(open_, m - before, m)
  position[open_] = m[open_]
  shape = np.shape(rows)
  return component.reshape(shape), position.reshape(shape)


def counts(num_rows: int, weights, seed: int) -> np.ndarray:
  """int64 [K]: how many of the global rows 0 .. num_rows - 1 each component gives."""
  out = np.zeros(len(weights), np.int64)
  m = int(num_rows)
  for c, (p, b) in enumerate(zip(split_probabilities(weights), offsets(len(weights), seed))):
    out[c] = int(np.floor(m * p + b))
    m -= int(out[c])
  out[-1] = m
  return out
