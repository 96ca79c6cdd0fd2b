"""Loader: row streams, per-process batch slices, prefetch off the training thread, global
arrays, and `make_data`, which builds the training iterator and the eval batches.

Training documents are dealt round-robin to data.batch_size row streams (stream j feeds
row j of every global batch); each stream joins its documents, each followed by the
end-of-document id, and cuts the result into rows of `seq_len + 1` tokens (inputs are
row[:-1], targets row[1:]), visited in a seeded order per (seed, stream, epoch). Each process
reads, tokenizes and packs only the documents of its streams (its slice of the batch rows),
so the global batch does not depend on the number of processes, and the iterator state
(`state()` / `restore()`, the global step) is global too.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Sequence

import numpy as np

from moetrain.config import ConfigError
from moetrain.data import sources
from moetrain.data.packing import (deal_streams, epoch_order, pack, pack_streams,
                                   split_documents, to_batch, unigram_entropy)
from moetrain.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                      make_tokenizer)


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process `process_index` of `process_count` builds."""
  if batch_size % process_count:
    raise ConfigError(f'data.batch_size={batch_size} is not divisible by the '
                      f'{process_count} processes; choose a multiple of the process count.')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class Batches:
  """Endless batches of row streams: row slot j of every global batch is fed by stream j.

  This process holds the rows int32 [n_j, L + 1] of its streams (`stream_ids`, a slice of
  range(num_streams)). At global step t stream j gives rows_j[order[t % n_j]], with order =
  epoch_order(seed, j, t // n_j, n_j). Each call returns this process's slice [streams, L]
  of the global batch; `state()` / `restore(state)` are the global step, so a resumed run
  (with any number of processes) sees exactly the batches the uninterrupted run would have.
  """

  def __init__(self, stream_rows: list[np.ndarray], stream_ids: Sequence[int],
               num_streams: int, seed: int, *, eod_id: int | None = None,
               document_mask: bool = False):
    for j, rows_NR in zip(stream_ids, stream_rows):
      if not len(rows_NR):
        raise ConfigError(
            f'training stream {j} of data.batch_size={num_streams} packs into no row of '
            f'data.seq_len={rows_NR.shape[1] - 1} tokens (documents are dealt round-robin to '
            'one stream per batch row); lower data.batch_size or data.seq_len, or add '
            'documents.')
    self.stream_rows, self.stream_ids = list(stream_rows), list(stream_ids)
    self.num_streams, self.seed = num_streams, seed
    self.eod_id, self.document_mask = eod_id, document_mask
    self.step = 0
    self._orders = {}  # stream -> (epoch, order [n_j]) of the last epoch used.

  def _row(self, k: int, step: int) -> np.ndarray:
    """int32 [L + 1]: the row local stream k gives at global step `step`."""
    j, rows_NR = self.stream_ids[k], self.stream_rows[k]
    epoch, index = divmod(step, len(rows_NR))
    cached_epoch, order = self._orders.get(j, (-1, None))
    if cached_epoch != epoch:
      order = epoch_order(self.seed, j, epoch, len(rows_NR))
      self._orders[j] = (epoch, order)
    return rows_NR[order[index]]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows_BR = np.stack([self._row(k, self.step) for k in range(len(self.stream_rows))])
    self.step += 1
    return to_batch(rows_BR, self.eod_id, self.document_mask)

  def state(self) -> dict:
    return dict(step=self.step, streams=self.num_streams)

  def restore(self, state: dict):
    if 'step' not in state or int(state.get('streams', -1)) != self.num_streams:
      raise ConfigError(f'the saved data iterator state {state} is not one of '
                        f'data.batch_size={self.num_streams} row streams; resume with the '
                        'data config (and code version) the run was started with.')
    self.step = int(state['step'])


class Prefetch:
  """Runs an iterator with `state()`/`restore()` in a background thread, `depth` batches
  ahead (bounded queue). `state()` is the state after the last batch handed out, so it can
  be checkpointed as if there were no prefetch."""

  def __init__(self, source, depth: int):
    self.source, self.depth = source, depth
    self._state = source.state()
    self._thread = None

  def _start(self):
    self._queue = queue.Queue(maxsize=self.depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True,
                                    name='moetrain-prefetch')
    self._thread.start()

  def _produce(self):
    while not self._stop.is_set():
      try:
        item = (next(self.source), self.source.state(), None)
      except Exception as e:  # handed to the consumer, raised there.
        item = (None, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.depth == 0:
      batch = next(self.source)
      self._state = self.source.state()
      return batch
    if self._thread is None:
      self._start()
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def close(self):
    """Stops the background thread (the next batch restarts it)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def state(self) -> dict:
    return dict(self._state)

  def restore(self, state: dict):
    self.close()
    self.source.restore(state)
    self._state = self.source.state()


def to_global(batch: dict, sharding) -> dict:
  """A process-local batch slice (dict of [B / processes, ...] arrays) -> global jax.Arrays
  [B, ...] laid out by `sharding`; with one process, the same as `jax.device_put`."""
  import jax
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


@dataclasses.dataclass
class Data:
  train: Prefetch  # endless batches (this process's slice), with state() / restore().
  eval_batches: list  # fixed list of eval batches (dicts), this process's slices.
  tokenizer: ByteTokenizer | HFTokenizer | SentencePieceTokenizer
  eval_unigram_entropy: float  # of the global eval targets (the same in every process).
  num_train_tokens: int  # target tokens in the rows of THIS process's streams.


def agree_on_error(failed_here: bool) -> ConfigError | None:
  """Multi-process: an error only some processes can see (a stream of theirs packs into no
  row) must stop every process, or the others would wait for it in a collective."""
  from jax.experimental import multihost_utils
  failed_N = multihost_utils.process_allgather(np.int32(failed_here))
  if failed_here or not failed_N.any():
    return None
  return ConfigError(f'process {int(np.argmax(failed_N))} found a training stream with no '
                     'row (its log names it); lower data.batch_size or data.seq_len, or add '
                     'documents.')


def make_data(cfg, process_index: int | None = None, process_count: int | None = None) -> Data:
  """Builds the training iterator and the fixed eval batches from the config.

  process_index / process_count default to jax's. Training documents are dealt to
  data.batch_size row streams; this process reads and tokenizes only the documents of its
  streams (process_slice of the batch rows). The eval split is small: every process reads
  all eval documents, packs the global eval rows and keeps its slice of each eval batch.
  """
  jax_processes = process_index is None or process_count is None
  if jax_processes:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  d = cfg.data
  local = process_slice(d.batch_size, process_index, process_count)
  tokenizer = make_tokenizer(d)
  corpus = sources.open_corpus(d)
  train_idx, eval_idx = split_documents(corpus.num_documents, d.eval_fraction, cfg.seed)
  if len(train_idx) < d.batch_size:
    raise ConfigError(f'the training split has {len(train_idx)} documents, fewer than the '
                      f'data.batch_size={d.batch_size} row streams they are dealt to; lower '
                      'data.batch_size or add documents.')
  streams_docs = deal_streams(train_idx, d.batch_size)[local]
  local_train = np.concatenate(streams_docs)
  wanted = np.concatenate([local_train, eval_idx])
  texts = dict(zip(wanted.tolist(), corpus.read(wanted)))
  encode = lambda idx: dict(zip(idx.tolist(), tokenizer.encode_batch([texts[i] for i in idx])))
  stream_rows = pack_streams(encode(local_train), streams_docs, tokenizer.eod_id, d.seq_len)
  error = None
  try:
    batches = Batches(stream_rows, range(d.batch_size)[local], d.batch_size, cfg.seed,
                      eod_id=tokenizer.eod_id, document_mask=d.document_mask)
  except ConfigError as e:
    error = e
  if jax_processes and process_count > 1:
    error = error or agree_on_error(error is not None)
  if error is not None:
    raise error
  eval_tokens = encode(eval_idx)
  eval_rows = pack([eval_tokens[i] for i in eval_idx.tolist()], tokenizer.eod_id, d.seq_len)
  if len(eval_rows) < d.batch_size:
    raise ConfigError(f'the eval split has {len(eval_rows)} rows, fewer than '
                      f'data.batch_size={d.batch_size}; raise data.eval_fraction, lower '
                      'batch_size or add documents.')
  eval_rows = eval_rows[:cfg.train.eval_batches * d.batch_size]
  global_eval = [eval_rows[i:i + d.batch_size]
                 for i in range(0, len(eval_rows) - d.batch_size + 1, d.batch_size)]
  eval_batches = [to_batch(rows[local], tokenizer.eod_id, d.document_mask)
                  for rows in global_eval]
  targets = np.concatenate([rows[:, 1:] for rows in global_eval])
  return Data(Prefetch(batches, d.prefetch), eval_batches, tokenizer,
              unigram_entropy(targets), sum(rows[:, 1:].size for rows in stream_rows))
