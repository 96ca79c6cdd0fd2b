"""The platform a program is built for: the default backend, or the one that
`moetrain compile` targets (a TPU topology compiled ahead of time on a CPU host).

Choices made while tracing (the attention kernel, the dropless implementation, how the
local experts run) read `name()` instead of `jax.default_backend()`, so an ahead-of-time
compile for TPU traces the program a TPU would run.
"""

from __future__ import annotations

import contextlib

import jax

_target: list[str] = []


def name() -> str:
  """'cpu', 'gpu' or 'tpu': the compile target if one is set, else the default backend."""
  return _target[-1] if _target else jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
  """Within this block, `name()` is `platform`."""
  _target.append(platform)
  try:
    yield
  finally:
    _target.pop()
