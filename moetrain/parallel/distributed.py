"""Multi-process start-up: every process of a multi-host run calls `initialize` before
jax touches a device; afterwards `jax.devices()` lists the devices of all processes and
one mesh spans them.

Three ways in: explicit (`--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, as launch/local.sh does on one machine), detected (`--distributed`:
JAX reads Cloud TPU pod metadata, SLURM or Open MPI variables; or, for any other
launcher, the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or single-process (nothing given).

A process that dies (killed, out of memory, its host gone) stops showing signs of life
(`PeerWatch`); after `heartbeat_timeout` seconds the others stop too, each with one line
naming the dead process, instead of waiting out JAX's 100 s heartbeat timeout and
aborting with a stack dump.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

import jax

from moetrain.config import ConfigError

HEARTBEAT_TIMEOUT = 10  # seconds without a sign of life before a process counts as dead.


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, auto: bool = False,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> bool:
  """Starts jax.distributed when asked, and the watch over the other processes; returns
  whether it did."""
  explicit = (coordinator_address, num_processes, process_id)
  given = [v is not None for v in explicit]
  if any(given) and not all(given):
    raise ConfigError('multi-process needs --coordinator_address, --num_processes and '
                      '--process_id together; pass all three (or --distributed on a '
                      'TPU pod or SLURM).')
  if heartbeat_timeout < 1:
    raise ConfigError(f'--heartbeat_timeout={heartbeat_timeout} must be at least 1 second; '
                      f'the default is {HEARTBEAT_TIMEOUT}.')
  # JAX's own heartbeat timeout ends a process with a stack dump: keep it well above ours.
  jax_timeout = max(100, 3 * heartbeat_timeout)
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} is outside [0, {num_processes}); '
                        'number the processes 0..num_processes-1.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=jax_timeout)
  elif auto:
    jax.distributed.initialize(*from_environment(os.environ),
                               heartbeat_timeout_seconds=jax_timeout)
  else:
    return False
  global WATCH
  WATCH = PeerWatch(heartbeat_timeout)
  WATCH.start()
  return True


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


WATCH: 'PeerWatch | None' = None  # the watch of this process, once initialize started it.


def give_the_watch_time():
  """After an error from the runtime in a multi-process run (most likely a collective
  whose peer died: 'Connection reset by peer'), waits until the watch has had time to
  name a dead process (it then ends this process itself); returns if none is found."""
  if WATCH is not None and not WATCH.stopped.is_set():
    time.sleep(WATCH.timeout + 3 * WATCH.interval)


def exit_now(code: int):
  """Ends a process of a multi-process run that failed without jax.distributed's exit
  barrier (which waits up to 5 min for processes that may be dead or still training)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def dead_peer_message(dead: int, me: int, timeout: float) -> str:
  """The line a process prints when process `dead` stopped responding."""
  who = f'process {dead}' + (' (the coordinator)' if dead == 0 else '')
  return (f'moetrain: {who} stopped responding (no sign of life for {timeout:g} s), so '
          f'process {me} stops too; see its log, then run the same command again to resume '
          'from the last checkpoint.')


class PeerWatch:
  """A daemon thread that keeps an eye on the other processes through the coordination
  service's key-value store: every `interval` seconds it bumps this process's counter
  and reads the others'. A process whose counter has not moved for `timeout` seconds (3x
  that before it first showed up), or a coordinator that no longer answers, ends this
  process with `dead_peer_message` and exit status 1 (its other threads may be blocked in
  a collective with the dead process). A process that exits normally says so first."""

  PREFIX = 'moetrain_alive/'

  def __init__(self, timeout: float, interval: float = 1.0):
    from jax._src import distributed as jax_distributed  # the client has the key-value store.
    self.client = jax_distributed.global_state.client
    self.me, self.count = jax.process_index(), jax.process_count()
    self.timeout, self.interval = timeout, interval
    self.stopped = threading.Event()
    self.thread = threading.Thread(target=self._run, name='moetrain-peer-watch', daemon=True)

  def start(self):
    self.thread.start()
    atexit.register(self.stop)  # before jax.distributed's own shutdown (atexit is LIFO).

  def stop(self):
    """Tells the others this process ends normally, and stops watching."""
    if self.stopped.is_set():
      return
    self.stopped.set()
    with contextlib.suppress(Exception):
      self.client.key_value_set(f'{self.PREFIX}{self.me}', 'done', allow_overwrite=True)

  def _run(self):
    start = time.monotonic()
    last, moved = {}, {}
    beat = 0
    while not self.stopped.wait(self.interval):
      beat += 1
      try:
        self.client.key_value_set(f'{self.PREFIX}{self.me}', str(beat), allow_overwrite=True)
        values = {k.rsplit('/', 1)[-1]: v for k, v in self.client.key_value_dir_get(self.PREFIX)}
      except Exception:  # noqa: BLE001 -- the coordination service is gone with process 0.
        if not self.stopped.is_set():
          self._end(0, time.monotonic() - max(moved.values(), default=start))
        return
      now = time.monotonic()
      for peer in range(self.count):
        value = values.get(str(peer))
        if peer == self.me or value == 'done':
          continue
        if value != last.get(peer):
          last[peer], moved[peer] = value, now
        limit = self.timeout if value is not None else 3 * self.timeout
        if now - moved.get(peer, start) > limit and not self.stopped.is_set():
          self._end(peer, self.timeout)

  def _end(self, dead: int, seconds: float):
    print(dead_peer_message(dead, self.me, round(seconds)), file=sys.stderr, flush=True)
    os._exit(1)
