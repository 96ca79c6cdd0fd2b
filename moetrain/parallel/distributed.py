"""Multi-process start-up: every process of a multi-host run calls `initialize` before
jax touches a device; afterwards `jax.devices()` lists the devices of all processes and
one mesh spans them.

Three ways in: explicit (`--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, as launch/local.sh does on one machine), detected (`--distributed`:
JAX reads Cloud TPU pod metadata, SLURM or Open MPI variables), or single-process
(nothing given).
"""

from __future__ import annotations

import jax

from moetrain.config import ConfigError


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, auto: bool = False) -> bool:
  """Starts jax.distributed when asked; returns whether it did."""
  explicit = (coordinator_address, num_processes, process_id)
  given = [v is not None for v in explicit]
  if any(given) and not all(given):
    raise ConfigError('multi-process needs --coordinator_address, --num_processes and '
                      '--process_id together; pass all three (or --distributed on a '
                      'TPU pod or SLURM).')
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} is outside [0, {num_processes}); '
                        'number the processes 0..num_processes-1.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  if auto:
    jax.distributed.initialize()
    return True
  return False
