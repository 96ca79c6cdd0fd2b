"""Preemption: SIGTERM and SIGINT become a request to save and stop, agreed on by every
process (`PreemptionHandler`)."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionHandler:
  """Context manager that turns SIGTERM and SIGINT into a stop request.

  The loop polls `stop_requested()` after each step, then saves and returns. A second
  signal raises KeyboardInterrupt. The previous handlers come back on exit. Outside the
  main thread (where Python cannot install handlers) it never requests a stop.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    # Only records the signal: printing here could re-enter a print in progress.
    if self.signum is not None:
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}')
    self.signum = signum

  def stop_requested(self) -> bool:
    """True once any process got a signal (all processes agree, so all save together)."""
    requested = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
    return requested

  def describe(self, step: int) -> str:
    """The log line for a stop at `step`."""
    return (f'{self._name()} received: saving a checkpoint at step {step} and exiting (send '
            'it again to stop at once).')

  def describe_sweep(self, run: str) -> str:
    """The log line for a sweep stopped at run `run`."""
    return (f'sweep stopped by {self._name()} at run {run}; run the same command again to '
            'resume it.')

  def _name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else 'a stop request'
