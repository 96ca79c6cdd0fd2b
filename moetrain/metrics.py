"""Metric logging: tensorboardX scalars and histograms, a JSONL of every scalar, and
routing statistics per MoE layer. Only process 0 writes."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import numpy as np

from moetrain import paths
from moetrain import staged as staged_lib

JSONL = 'metrics.jsonl'
SYNC_SECONDS = 60.0  # in a bucket: the longest time between uploads of the logs.
SEGMENT_BYTES = 16 * 2**20  # in a bucket: a new JSONL segment or event file past this.


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
  1-D arrays as TensorBoard histograms.

  In a bucket (a gs:// workdir, or `staged=True`), where objects cannot be appended to,
  both are written locally and uploaded whole (moetrain.staged) every `sync_seconds`, at
  `flush` (training calls it before each checkpoint save, so the metrics of every step up
  to the newest checkpoint are in the bucket) and at `close`. The JSONL goes to numbered
  segments `metrics.jsonl.000001`, `.000002`, ... (one or more per run, a new one past
  `segment_bytes`), which `read_jsonl('.../metrics.jsonl')` reads in order; event files
  also start anew past `segment_bytes`, so an upload never exceeds it by much.
  """

  def __init__(self, workdir, enabled: bool | None = None, *, staged: bool | None = None,
               sync_seconds: float = SYNC_SECONDS, segment_bytes: int = SEGMENT_BYTES):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = paths.path(workdir)
    self.sync_seconds, self.segment_bytes = sync_seconds, segment_bytes
    self._tb = self._jsonl = self._staged = None
    if not self.enabled:
      return
    if paths.is_cloud(self.workdir) if staged is None else staged:
      self._staged = staged_lib.StagedFolder(self.workdir)
      self._segment = next_segment(self.workdir / JSONL)
      self._synced_at = time.monotonic()
    else:
      paths.make_dirs(self.workdir)
    self._open_tb()
    self._open_jsonl()

  def _local(self, name: str):
    return self._staged.file(name) if self._staged else self.workdir / name

  def _open_tb(self):
    from tensorboardX import SummaryWriter
    # A unique suffix: a run resumed within the same second must not reuse (and truncate)
    # the previous run's event file.
    self._tb_suffix = f'.{time.time_ns()}'
    self._tb = SummaryWriter(str(self._local('tb')), filename_suffix=self._tb_suffix)

  def _open_jsonl(self):
    self._jsonl_name = f'{JSONL}.{self._segment:06d}' if self._staged else JSONL
    self._jsonl = open(self._local(self._jsonl_name), 'a')

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
    if self._staged:
      self._roll()
      if time.monotonic() - self._synced_at >= self.sync_seconds:
        self.flush()

  def _roll(self):
    """Starts a new JSONL segment once the current one is big."""
    if self._jsonl.tell() >= self.segment_bytes:
      self._jsonl.close()
      self._staged.finish(self._jsonl_name)
      self._segment += 1
      self._open_jsonl()

  def flush(self):
    """Everything written so far reaches the workdir (in a bucket: one upload per file
    that grew; an event file past segment_bytes is closed and a new one started here,
    where its size is known: tensorboardX writes it in the background)."""
    if not self.enabled:
      return
    self._tb.flush()
    self._jsonl.flush()
    if self._staged:
      events = list((self._staged.local / 'tb').glob(f'*{self._tb_suffix}'))
      if events and events[0].stat().st_size >= self.segment_bytes:
        self._tb.close()
        self._staged.finish(f'tb/{events[0].name}')
        self._open_tb()
      self._staged.sync()
      self._synced_at = time.monotonic()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      if self._staged:
        self._staged.close()


def next_segment(path) -> int:
  """The number of the next JSONL segment beside `path` (1 when there is none)."""
  return max((n for n, _ in _segments(path)), default=0) + 1


def _segments(path) -> list[tuple[int, object]]:
  """(number, path) of the segments `path`.NNNNNN, in order."""
  path = paths.path(path)
  found = []
  for p in paths.glob(path.parent, f'{path.name}.*'):
    suffix = p.name[len(path.name) + 1:]
    if suffix.isdigit():
      found.append((int(suffix), p))
  return sorted(found, key=lambda s: s[0])


def jsonl_files(path) -> list:
  """The files holding the records of `path`: itself (a local run's metrics.jsonl) and its
  numbered segments (a run in a bucket), in order."""
  path = paths.path(path)
  return ([path] if paths.is_file(path) else []) + [p for _, p in _segments(path)]


def read_jsonl(path) -> list[dict]:
  """All records of a metrics.jsonl file (and of its segments, in order)."""
  files = jsonl_files(path)
  if not files:
    raise FileNotFoundError(f'{path} does not exist')
  return [json.loads(line) for f in files for line in paths.read_text(f).splitlines()
          if line.strip()]
