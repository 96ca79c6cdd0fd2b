"""Loader: prepared token files read at random, the seeded row order, per-process batch
slices, prefetch off the training thread, global arrays, and `make_data`, which builds the
training iterator and the eval batches.

Every source trains from prepared token files: `data.source='prepared'` names them (one
directory in data.paths, or several in data.mixture); stdlib, files and hub sources are
first tokenized into the cache (`prepare.prepare_cached`). A directory's training tokens
are one stream (documents in source order, each followed by the end-of-document id) cut
into rows of seq_len + 1 tokens (inputs are row[:-1], targets row[1:]; the tail shorter than
a row is unused). Row slot k of the batch at step t is global row n = t * batch_size + k;
the mixture gives it a component and a position p in that component's rows, and the row
read is `permute(p mod N, N, key(seed, component, epoch = p // N))` of the component's N
rows. Each process builds only its slice of the batch rows and reads only those rows, so
the global batch does not depend on the number of processes; opening reads only the index,
so start-up time and memory do not grow with the corpus; the iterator state is the step.
"""

from __future__ import annotations

import dataclasses
import pathlib
import queue
import threading

import numpy as np

from moetrain import config as config_lib
from moetrain.config import ConfigError
from moetrain.data import mixture, prepare, shuffle
from moetrain.data.packing import to_batch, unigram_entropy
from moetrain.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                      fingerprint, make_tokenizer)

ROW_TAG = 0x120E  # keys the row order apart from the other uses of the seed.


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process `process_index` of `process_count` builds."""
  if batch_size % process_count:
    raise ConfigError(f'data.batch_size={batch_size} is not divisible by the '
                      f'{process_count} processes; choose a multiple of the process count.')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class TokenFiles:
  """The token files of one split of a prepared directory, read as one int32 array:
  `read(start, stop)` reads only those tokens from disk (nothing is mapped or kept, so
  memory does not grow with what has been read)."""

  def __init__(self, paths: list[pathlib.Path], counts: list[int], dtype: str):
    self.paths, self.dtype = list(paths), np.dtype(dtype)
    self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """int32 [stop - start]: tokens start .. stop - 1 of the split."""
    out = np.empty(stop - start, np.int32)
    shard = int(np.searchsorted(self.offsets, start, side='right')) - 1
    position = start
    while position < stop:
      low, high = int(self.offsets[shard]), min(int(self.offsets[shard + 1]), stop)
      if high > position:
        out[position - start:high - start] = np.fromfile(
            self.paths[shard], self.dtype, high - position,
            offset=(position - low) * self.dtype.itemsize)
      position, shard = max(position, high), shard + 1
    return out


@dataclasses.dataclass
class Prepared:
  """An opened prepared directory: its index and its train and eval token files."""
  path: pathlib.Path
  index: dict
  train: TokenFiles
  eval: TokenFiles


def describe(tokenizer_fingerprint: dict) -> str:
  """'byte', or a tokenizer file's name and the start of its sha256."""
  name, digest = tokenizer_fingerprint['name'], tokenizer_fingerprint['sha256']
  return repr(name) if digest == 'byte' else f'{name!r} (sha256 {digest[:12]})'


def open_prepared(path, tokenizer_fingerprint: dict, where: str) -> Prepared:
  """Opens a prepared directory after checking, without reading any token, that its index
  is of this format version, was made with this tokenizer, and lists shard files that are
  there with the sizes it gives. Each problem is one sentence naming the file and the fix."""
  path = pathlib.Path(path).expanduser()
  index_path = path / prepare.INDEX
  rerun = 'run the same `moetrain data prepare` command again to finish it'
  if not path.is_dir():
    raise ConfigError(f'{where}={str(path)!r} is not a directory; write one with `moetrain '
                      f'data prepare --config=... --output={path}`.')
  if not index_path.is_file():
    if (path / prepare.PLAN).is_file():
      raise ConfigError(f'{index_path} does not exist because its preparation did not '
                        f'finish; {rerun}.')
    raise ConfigError(f'{index_path} does not exist; point {where} at a directory written '
                      'by `moetrain data prepare`.')
  index = prepare.read_json(index_path)
  if index.get('format') != prepare.FORMAT or index.get('version') != prepare.VERSION:
    raise ConfigError(f'{index_path} is an index of format {index.get("format")!r} version '
                      f'{index.get("version")!r}, and this moetrain reads {prepare.FORMAT!r} '
                      f'version {prepare.VERSION}; prepare the source again into a new '
                      'directory with `moetrain data prepare --output=NEW_DIR`.')
  made_with = index['tokenizer']
  if made_with['sha256'] != tokenizer_fingerprint['sha256']:
    raise ConfigError(f'{index_path} was prepared with data.tokenizer={describe(made_with)}, '
                      f'not data.tokenizer={describe(tokenizer_fingerprint)}; set '
                      'data.tokenizer to the one it was prepared with, or prepare the source '
                      'again with this one.')
  itemsize = np.dtype(index['dtype']).itemsize
  for meta in index['shards']:
    if problem := prepare.shard_problem(path, meta, itemsize):
      raise ConfigError(f'{problem}; run the same `moetrain data prepare` command again, '
                        'which redoes only the damaged shards.')
  files = {split: TokenFiles([path / m[split]['file'] for m in index['shards']],
                             [m[split]['tokens'] for m in index['shards']], index['dtype'])
           for split in prepare.SPLITS}
  return Prepared(path, index, files['train'], files['eval'])


@dataclasses.dataclass
class Component:
  """One prepared directory of the data (of a mixture, or the only one)."""
  name: str
  prepared: Prepared
  weight: float


def read_rows(files: TokenFiles, rows, seq_len: int) -> np.ndarray:
  """int32 [n, seq_len + 1]: rows `rows` of the split's token stream."""
  width = seq_len + 1
  rows_NW = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    rows_NW[i] = files.read(int(r) * width, (int(r) + 1) * width)
  return rows_NW


class Batches:
  """Endless batches: this process's slice [local rows, seq_len] of each global batch.

  Global row n = step * batch_size + slot comes from component c at position p
  (`mixture.assign`), which reads row permute(p mod N_c, N_c, key(seed, c, p // N_c)) of
  c's N_c training rows. `state()` / `restore(state)` hold the global step (the tokens
  each component has given are a function of it), so a resumed run with any number of
  processes sees exactly the batches the uninterrupted run would have.
  """

  def __init__(self, components: list[Component], seq_len: int, batch_size: int,
               local: slice, seed: int, *, eod_id: int | None = None,
               document_mask: bool = False):
    self.components, self.seq_len, self.batch_size = components, seq_len, batch_size
    self.slots = np.arange(batch_size)[local]
    self.seed, self.eod_id, self.document_mask = seed, eod_id, document_mask
    self.weights = [c.weight for c in components]
    self.num_rows = [len(c.prepared.train) // (seq_len + 1) for c in components]
    for c, n in zip(components, self.num_rows):
      if not n:
        raise ConfigError(f'{c.prepared.path} holds {len(c.prepared.train)} training '
                          f'tokens, less than one row of data.seq_len={seq_len} + 1; lower '
                          'data.seq_len or add documents.')
    self.step = 0

  def rows_at(self, step: int) -> np.ndarray:
    """int32 [local rows, seq_len + 1]: this process's rows of the batch at `step`."""
    component_R, position_R = mixture.assign(step * self.batch_size + self.slots,
                                             self.weights, self.seed)
    rows_RW = np.zeros((len(self.slots), self.seq_len + 1), np.int32)
    for c in np.unique(component_R):
      chosen = np.flatnonzero(component_R == c)
      epoch_R, index_R = np.divmod(position_R[chosen], self.num_rows[c])
      for epoch in np.unique(epoch_R):
        same = epoch_R == epoch
        key = shuffle.hash_ints(self.seed, ROW_TAG, c, epoch)
        row_ids = shuffle.permute(index_R[same], self.num_rows[c], key)
        rows_RW[chosen[same]] = read_rows(self.components[c].prepared.train, row_ids,
                                          self.seq_len)
    return rows_RW

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows_RW = self.rows_at(self.step)
    self.step += 1
    return to_batch(rows_RW, self.eod_id, self.document_mask)

  def tokens_seen(self, step: int) -> dict[str, int]:
    """Target tokens each component has given in steps 0 .. step - 1 (all processes)."""
    rows_K = mixture.counts(step * self.batch_size, self.weights, self.seed)
    return {c.name: int(n) * self.seq_len for c, n in zip(self.components, rows_K)}

  def state(self) -> dict:
    state = dict(step=self.step, batch_size=self.batch_size)
    if len(self.components) > 1:
      state['tokens_seen'] = self.tokens_seen(self.step)
    return state

  def restore(self, state: dict):
    if 'step' not in state or state.get('batch_size') != self.batch_size:
      raise ConfigError(f'the saved data iterator state {state} is not one of this data '
                        f'layout with data.batch_size={self.batch_size}; resume with the data '
                        'config (and code version) the run was started with.')
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


def state_metrics(state: dict) -> dict[str, int]:
  """The metrics of an iterator state: `data/mixture/<name>/tokens_seen` per component."""
  return {f'data/mixture/{name}/tokens_seen': tokens
          for name, tokens in state.get('tokens_seen', {}).items()}


def open_components(cfg, tokenizer, log=None) -> list[Component]:
  """The prepared directories the config trains from, opened and checked: data.paths or
  data.mixture for source 'prepared'; for a text source, its cache directory (tokenized
  first if it is not there yet)."""
  d = cfg.data
  if d.source == 'prepared' and d.mixture.strip():
    entries, where = config_lib.parse_mixture(d.mixture), 'data.mixture'
  elif d.source == 'prepared':
    path = d.paths.strip()
    entries, where = [(pathlib.Path(path).name, path, 1.0)], 'data.paths'
  else:
    path = prepare.prepare_cached(cfg, progress=bool(log) and cfg.train.progress, log=log)
    entries, where = [(d.source, str(path), 1.0)], 'data.cache_dir'
  tokenizer_fingerprint = fingerprint(d, tokenizer)
  return [Component(name, open_prepared(path, tokenizer_fingerprint, where), weight)
          for name, path, weight in entries]


def eval_rows(components: list[Component], seq_len: int, batch_size: int, num_batches: int,
              seed: int) -> list[np.ndarray]:
  """The global eval batches, int32 [batch_size, seq_len + 1] each: up to num_batches, the
  rows of each component's eval stream in order, mixed by the weights like training rows."""
  available = [len(c.prepared.eval) // (seq_len + 1) for c in components]
  component_N, position_N = mixture.assign(np.arange(num_batches * batch_size),
                                           [c.weight for c in components], seed)
  short = np.flatnonzero(position_N >= np.asarray(available)[component_N])
  usable = (int(short[0]) if len(short) else len(component_N)) // batch_size * batch_size
  if not usable:
    c = int(component_N[short[0]])
    raise ConfigError(f'the eval split of {components[c].prepared.path} has {available[c]} '
                      f'rows of data.seq_len={seq_len} + 1 tokens, too few for one batch of '
                      f'data.batch_size={batch_size}; raise data.eval_fraction, lower '
                      'data.batch_size or add documents.')
  rows_NW = np.zeros((usable, seq_len + 1), np.int32)
  for c in range(len(components)):
    chosen = np.flatnonzero(component_N[:usable] == c)
    if len(chosen):
      rows_NW[chosen] = read_rows(components[c].prepared.eval, position_N[chosen], seq_len)
  return [rows_NW[i:i + batch_size] for i in range(0, usable, batch_size)]


def describe_components(components: list[Component], num_train_tokens: int) -> str:
  if len(components) == 1:
    return f'{num_train_tokens:,} training tokens in {components[0].prepared.path}'
  parts = ', '.join(f'{c.name} {c.weight:.3g}' for c in components)
  return f'{num_train_tokens:,} training tokens in a mixture of {parts}'


@dataclasses.dataclass
class Data:
  train: Prefetch  # endless batches (this process's slice), with state() / restore().
  eval_batches: list  # fixed list of eval batches (dicts), this process's slices.
  tokenizer: ByteTokenizer | HFTokenizer | SentencePieceTokenizer
  eval_unigram_entropy: float  # of the global eval targets (the same in every process).
  num_train_tokens: int  # target tokens in one pass over every component's training rows.
  description: str  # e.g. '1,234 training tokens in DIR', for the log.


def make_data(cfg, process_index: int | None = None, process_count: int | None = None, *,
              log=None) -> Data:
  """Builds the training iterator and the fixed eval batches from the config.

  process_index / process_count default to jax's; each process builds and reads only its
  slice (process_slice) of every batch. A text source is tokenized into the cache on first
  use (with a line to `log` and, when train.progress, a progress bar).
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  d = cfg.data
  local = process_slice(d.batch_size, process_index, process_count)
  tokenizer = make_tokenizer(d)
  components = open_components(cfg, tokenizer, log if process_index == 0 else None)
  batches = Batches(components, d.seq_len, d.batch_size, local, cfg.seed,
                    eod_id=tokenizer.eod_id, document_mask=d.document_mask)
  global_eval = eval_rows(components, d.seq_len, d.batch_size, cfg.train.eval_batches,
                          cfg.seed)
  eval_batches = [to_batch(rows[local], tokenizer.eod_id, d.document_mask)
                  for rows in global_eval]
  targets = np.concatenate([rows[:, 1:] for rows in global_eval])
  num_train_tokens = sum(batches.num_rows) * d.seq_len
  return Data(Prefetch(batches, d.prefetch), eval_batches, tokenizer,
              unigram_entropy(targets), num_train_tokens,
              describe_components(components, num_train_tokens))
