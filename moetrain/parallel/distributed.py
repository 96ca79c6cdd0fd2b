"""Multi-process start-up: every process of a multi-host run calls `initialize` before
jax touches a device; afterwards `jax.devices()` lists the devices of all processes and
one mesh spans them.

Three ways in: explicit (`--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, as launch/local.sh does on one machine), detected (`--distributed`:
JAX reads Cloud TPU pod metadata, SLURM or Open MPI variables; or, for any other
launcher, the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or single-process (nothing given).
"""

from __future__ import annotations

import os

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
    jax.distributed.initialize(*from_environment(os.environ))
    return True
  return False


ENVIRONMENT = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def from_environment(environ) -> tuple:
  """(coordinator_address, num_processes, process_id) from ENVIRONMENT when JAX_NUM_PROCESSES
  or JAX_PROCESS_ID is set; (None, None, None), which lets JAX detect the cluster, when not."""
  if not ({'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'} & environ.keys()):
    return None, None, None
  missing = [name for name in ENVIRONMENT if not environ.get(name)]
  if missing:
    found = [name for name in ENVIRONMENT if name not in missing]
    raise ConfigError(f'--distributed found {" and ".join(found)} '
                      f'but not {" and ".join(missing)}; set all of {", ".join(ENVIRONMENT)} '
                      'or none of them.')
  try:
    num_processes, process_id = (int(environ[name]) for name in ENVIRONMENT[1:])
  except ValueError:
    raise ConfigError(f'JAX_NUM_PROCESSES={environ["JAX_NUM_PROCESSES"]!r} and JAX_PROCESS_ID='
                      f'{environ["JAX_PROCESS_ID"]!r} must be integers; set them to the process '
                      'count and this process\'s index.') from None
  if not 0 < num_processes or not 0 <= process_id < num_processes:
    raise ConfigError(f'JAX_PROCESS_ID={process_id} is outside [0, JAX_NUM_PROCESSES='
                      f'{num_processes}); number the processes 0..JAX_NUM_PROCESSES-1.')
  return environ['JAX_COORDINATOR_ADDRESS'], num_processes, process_id
