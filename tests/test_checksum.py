"""Array checksums: the device version equals the NumPy one on every mesh, and damage to
any element changes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetrain import checksum


def reference(a) -> list[int]:
  """The checksum as a Python loop over the elements (the definition, spelled out)."""
  mask = 0xFFFFFFFF

  def fmix(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & mask
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & mask
    return x ^ (x >> 16)

  a = np.ascontiguousarray(a).reshape(-1)
  bits = a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize]).astype(np.int64)
  first = second = 0
  for i, b in enumerate(bits.tolist()):
    key = fmix((i * 0x9E3779B9 + 0x3C6EF372) & mask)
    first += fmix(b ^ key)
    second += fmix((((b + key) & mask) * 0x9E3779B9 & mask) ^ 0xA54FF53A)
  return [first & mask, second & mask]


@pytest.mark.parametrize('dtype', [np.float32, jnp.bfloat16, np.int32, np.uint32])
def test_numpy_checksum_matches_the_loop(dtype, rng):
  a = (rng.standard_normal((7, 5)) * 100).astype(dtype)
  assert checksum.numpy_checksum(a) == reference(a)


def test_device_checksums_equal_numpy_on_any_sharding(rng):
  devices = np.array(jax.devices()[:8])
  a = rng.standard_normal((16, 24)).astype(np.float32)
  b = rng.standard_normal((8, 4, 6)).astype(jnp.bfloat16)
  want = {'a': checksum.numpy_checksum(a), 'b': checksum.numpy_checksum(b),
          'step': checksum.numpy_checksum(np.int32(11))}
  for shape in ((1, 1), (2, 4), (8, 1), (4, 2)):
    mesh = jax.sharding.Mesh(devices[:shape[0] * shape[1]].reshape(shape), ('x', 'y'))
    flat = {'a': jax.device_put(a, NamedSharding(mesh, P('x', 'y'))),
            'b': jax.device_put(b, NamedSharding(mesh, P(None, 'y'))),
            'step': jax.device_put(np.int32(11), NamedSharding(mesh, P()))}
    assert checksum.device_checksums(flat) == want, shape


def test_any_damaged_element_changes_the_checksum(rng):
  a = rng.standard_normal(1000).astype(np.float32)
  clean = checksum.numpy_checksum(a)
  for _ in range(200):
    damaged = a.copy()
    damaged.view(np.uint32)[rng.integers(1000)] ^= np.uint32(1 << int(rng.integers(32)))
    assert checksum.numpy_checksum(damaged)[0] != clean[0]
  swapped = a.copy()
  swapped[[3, 700]] = swapped[[700, 3]]  # same values, other places.
  assert checksum.numpy_checksum(swapped) != clean
