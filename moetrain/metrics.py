"""Metric logging: tensorboardX scalars and histograms, a JSONL of every scalar, and
routing statistics per MoE layer. Only process 0 writes."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np


def routing_metrics(stats: list[dict], moe_layers: list[int]) -> dict:
  """Per-MoE-layer metrics from the layers' statistics dicts (device arrays in, out).

  Scalars: dropped_frac, load_max_over_mean, load_min_over_mean, router_entropy,
  max_logit (and bias_norm when present); `load` is the per-expert assignment fraction
  [E] (logged as a histogram).
  """
  out = {}
  for layer, s in zip(moe_layers, stats):
    load_E = s['load_E']
    mean = 1.0 / load_E.shape[0]
    prefix = f'moe/layer{layer}/'
    out[prefix + 'dropped_frac'] = s['dropped_frac']
    out[prefix + 'load_max_over_mean'] = load_E.max() / mean
    out[prefix + 'load_min_over_mean'] = load_E.min() / mean
    out[prefix + 'router_entropy'] = s['router_entropy']
    out[prefix + 'max_logit'] = s['max_logit']
    out[prefix + 'balance_loss'] = s['balance_loss']
    out[prefix + 'z_loss'] = s['z_loss']
    if 'bias_norm' in s:
      out[prefix + 'bias_norm'] = s['bias_norm']
    out[prefix + 'load'] = load_E
  return out


@dataclasses.dataclass(frozen=True)
class EvalTotals:
  """Sums over eval batches: `nats` of the target tokens' losses, `tokens` counted, and
  `bytes`, the UTF-8 bytes those tokens decode to (moetrain.token_bytes); `dropped`, the
  mean fraction of assignments each MoE layer dropped for capacity (one per MoE layer)."""
  nats: float
  tokens: float
  bytes: float
  dropped: tuple = ()

  @property
  def loss(self) -> float:
    """Mean cross-entropy, nats per token."""
    return self.nats / self.tokens

  @property
  def bits_per_token(self) -> float:
    return self.loss / math.log(2)

  @property
  def perplexity(self) -> float:
    return math.exp(self.loss)

  @property
  def bits_per_byte(self) -> float:
    """Total bits over the bytes of the text: comparable across tokenizers."""
    return self.nats / (math.log(2) * self.bytes) if self.bytes else float('nan')

  def scalars(self) -> dict:
    """What the training loop logs."""
    return {'eval/loss': self.loss, 'eval/bits_per_byte': self.bits_per_byte}


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` (appending, never truncating) and
  1-D arrays as TensorBoard histograms."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = pathlib.Path(workdir)
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.workdir.mkdir(parents=True, exist_ok=True)
      # A unique suffix: a run resumed within the same second must not reuse (and truncate)
      # the previous run's event file.
      self._tb = SummaryWriter(str(self.workdir / 'tb'), filename_suffix=f'.{time.time_ns()}')
      self._jsonl = open(self.workdir / 'metrics.jsonl', 'a')

  def write(self, step: int, metrics: dict):
    """Logs `metrics` (name -> number or array) at `step`."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    for name, value in sorted(metrics.items()):
      value = np.asarray(value)
      if value.ndim == 0:
        record[name] = float(value)
        self._tb.add_scalar(name, float(value), step)
      else:
        self._tb.add_histogram(name, value, step, bins='auto')
        record[name] = value.tolist()
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path) -> list[dict]:
  """All records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
