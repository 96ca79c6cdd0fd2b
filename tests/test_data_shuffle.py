"""Keyed hashes, the O(1) permutation and the mixture's row assignment, each against a
plain-Python integer reference (tests/data_helpers.py)."""

import numpy as np
import pytest

from moetrain.data import mixture, shuffle

from data_helpers import (hash_reference, mix64_reference, mixture_reference,
                          permute_reference, uniform_reference)


def test_hash_and_uniform_match_python_integers():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**63, 200, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  assert shuffle.mix64(x).tolist() == [mix64_reference(int(v)) for v in x]
  assert shuffle.hash_ints(3, -1, 2**70) == hash_reference(3, -1, 2**70)
  key = shuffle.hash_ints(7)
  got = shuffle.uniform(key, np.arange(300))
  assert got.tolist() == [uniform_reference(key, i) for i in range(300)]
  assert 0 <= got.min() and got.max() < 1 and abs(got.mean() - 0.5) < 0.06


@pytest.mark.parametrize('n', [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_permute_is_a_bijection_matching_the_reference(n):
  key = shuffle.hash_ints(n, 11)
  got = shuffle.permute(np.arange(n), n, key)
  assert sorted(got.tolist()) == list(range(n))
  assert got.tolist() == [permute_reference(i, n, key) for i in range(n)]
  assert shuffle.permute(n // 2, n, key) == got[n // 2]  # scalars too.


def test_permute_depends_on_the_key_and_looks_random():
  n, keys = 64, range(400)
  orders = np.stack([shuffle.permute(np.arange(n), n, shuffle.hash_ints(k)) for k in keys])
  assert len({tuple(o) for o in orders}) == len(keys)
  # Where index 0 lands: every position about equally often (400 / 64 = 6.25 each).
  counts = np.bincount(orders[:, 0], minlength=n)
  assert counts.max() <= 20
  fixed_points = (orders == np.arange(n)).sum(axis=1).mean()
  assert 0.5 < fixed_points < 1.5  # a uniform permutation has 1 on average.


@pytest.mark.parametrize('weights', [[1.0], [0.3, 0.7], [0.5, 0.2, 0.3], [1, 1, 1, 5]])
def test_mixture_assign_matches_the_loop_and_counts(weights):
  seed, rows = 3, 997
  w = np.asarray(weights, float) / sum(weights)
  component, position = mixture.assign(np.arange(rows), w, seed)
  assert list(zip(component.tolist(), position.tolist())) == mixture_reference(rows, w, seed)
  for n in (0, 1, 10, 500, rows):
    np.testing.assert_array_equal(mixture.counts(n, w, seed),
                                  np.bincount(component[:n], minlength=len(w)))
  for c in range(len(w)):  # each component's rows are numbered 0, 1, 2, ...
    assert position[component == c].tolist() == list(range((component == c).sum()))
  # Any prefix holds each component within K - 1 rows of its share (one per split).
  for n in range(1, rows, 7):
    assert np.abs(mixture.counts(n, w, seed) - w * n).max() <= max(len(w) - 1, 1e-9)

