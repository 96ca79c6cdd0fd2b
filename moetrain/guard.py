"""The divergence guard: decides, from each step's loss, gradient norm and finiteness, when
training has gone wrong, and which checkpoint is the last one known to be good.

The loss and gradient norm logged at step n are computed from the parameters saved as
checkpoint n-1, so step n is what vouches for checkpoint n-1: a checkpoint is *good* once
the step after it had a finite loss and gradient norm, finite new parameters, and neither
the loss nor the gradient norm spiked. A spike is a value far above the median of the
last `train.spike_window` good steps (loss above `spike_loss_factor` times that median,
taken as at least 1 nat; gradient norm above `spike_grad_factor` times its median).

A bad step stops training (DivergenceError) before anything after it is saved, naming the
last good checkpoint and how to resume from it. With `train.skip_nonfinite=True` a
non-finite update is skipped instead (the step function keeps the old state) and a spike
is logged; `train.max_bad_in_a_row` bad steps in a row stop the run all the same, so a
run whose parameters blew up never ends with only blown-up checkpoints.

The guard's history travels in the checkpoint metadata (`state()` / `from_state()`), so a
resumed run judges its steps exactly as the uninterrupted one would.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np


class DivergenceError(RuntimeError):
  """Training diverged; the message names the step, the cause and the good checkpoint."""


def median_or_none(values) -> float | None:
  """Median of a sequence, None when it is empty."""
  return float(np.median(list(values))) if values else None


def spike(value: float, history, factor: float, floor: float = 0.0) -> str | None:
  """'V is Rx the median M of the last N steps' when value > factor * max(median, floor),
  else None (also with no history or factor 0)."""
  median = median_or_none(history)
  if median is None or factor <= 0 or value <= factor * max(median, floor):
    return None
  ratio = value / max(median, 1e-30)
  return f'{value:.4g} is {ratio:.3g}x the median {median:.4g} of the last {len(history)} steps'


@dataclasses.dataclass
class Guard:
  """Host-side judge of the (step, nonfinite, loss, grad_norm) records of train steps.

  `saved` are the checkpoint steps of this run not yet vouched for; `last_good` the newest
  checkpoint vouched for (None: none known).
  """
  window: int = 50
  loss_factor: float = 3.0
  grad_factor: float = 20.0
  skip: bool = False
  max_bad_in_a_row: int = 3
  losses: collections.deque = dataclasses.field(default_factory=collections.deque)
  grad_norms: collections.deque = dataclasses.field(default_factory=collections.deque)
  bad_in_a_row: int = 0
  last_good: int | None = None
  saved: set = dataclasses.field(default_factory=set)
  lr_note: str = ''

  @classmethod
  def from_config(cls, train_cfg, saved: dict | None = None) -> 'Guard':
    """A guard for `train_cfg`, continuing the history in `saved` (a checkpoint's
    meta['guard'], absent in checkpoints of older versions)."""
    t = train_cfg
    guard = cls(t.spike_window, t.spike_loss_factor, t.spike_grad_factor, t.skip_nonfinite,
                t.max_bad_in_a_row, lr_note=f' (it is {t.lr:g})')
    saved = saved or {}
    guard.losses.extend(saved.get('losses', [])[-guard.window:] if guard.window else [])
    guard.grad_norms.extend(saved.get('grad_norms', [])[-guard.window:] if guard.window else [])
    guard.bad_in_a_row = saved.get('bad_in_a_row', 0)
    guard.last_good = saved.get('last_good')
    return guard

  def state(self) -> dict:
    """JSON for the checkpoint metadata."""
    return dict(losses=list(self.losses), grad_norms=list(self.grad_norms),
                bad_in_a_row=self.bad_in_a_row, last_good=self.last_good)

  def note_checkpoint(self, step: int):
    """A checkpoint of `step` exists (saved or restored); the next good step vouches for it."""
    self.saved.add(step)

  def problem(self, nonfinite: bool, loss: float, grad_norm: float) -> str | None:
    """What is wrong with one step's record, or None."""
    if not math.isfinite(loss):
      return f'a non-finite loss ({loss})'
    if not math.isfinite(grad_norm):
      return f'a non-finite gradient norm ({grad_norm})'
    if nonfinite:
      return 'non-finite new parameters'
    if self.window <= 0:
      return None
    why = spike(loss, self.losses, self.loss_factor, floor=1.0)
    if why:
      return f'a loss spike ({why})'
    why = spike(grad_norm, self.grad_norms, self.grad_factor)
    return f'a gradient-norm spike ({why})' if why else None

  def check(self, records, log=print):
    """Judges the records of the steps since the last check, in order (host values).

    A good step extends the history and vouches for the checkpoint before it. A bad one
    raises DivergenceError, or with `skip` is logged (a non-finite update was skipped by
    the step) until `max_bad_in_a_row` bad steps in a row raise it.
    """
    for step, nonfinite, loss, grad_norm in records:
      step, loss, grad_norm = int(step), float(loss), float(grad_norm)
      why = self.problem(bool(nonfinite), loss, grad_norm)
      if why is None:
        self._good(step, loss, grad_norm)
        continue
      self.bad_in_a_row += 1
      if not self.skip or self.bad_in_a_row >= self.max_bad_in_a_row:
        raise DivergenceError(self.message(step, why))
      action = 'update skipped' if nonfinite else 'update applied'
      log(f'step {step}: {why}; {action} ({self.bad_in_a_row} of '
          f'train.max_bad_in_a_row={self.max_bad_in_a_row} bad steps in a row).')

  def _good(self, step: int, loss: float, grad_norm: float):
    self.bad_in_a_row = 0
    if self.window > 0:
      for values, value in ((self.losses, loss), (self.grad_norms, grad_norm)):
        values.append(value)
        while len(values) > self.window:
          values.popleft()
    if step - 1 in self.saved:
      self.saved.discard(step - 1)
      self.last_good = step - 1

  def message(self, step: int, why: str) -> str:
    """The one sentence that stops a diverged run."""
    streak = (f' ({self.bad_in_a_row} bad steps in a row)' if self.skip else '')
    head = f'step {step} has {why}{streak}, so training stopped before saving it'
    if self.last_good is None:
      return (f'{head}, and no checkpoint is known to be good; lower train.lr'
              f'{self.lr_note} and train again in a new --workdir.')
    return (f'{head}; the last good checkpoint is step {self.last_good}: resume from it '
            f'with --config.checkpoint.restore_step={self.last_good} and a lower train.lr'
            f'{self.lr_note}.')
