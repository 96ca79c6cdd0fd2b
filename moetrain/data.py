"""Data: sources, tokenizers, packing, a deterministic split, per-process batches, prefetch.

Sources (`data.source`):
  stdlib  the Python standard library's own `.py` source (found through `sysconfig`, test
          suites excluded): present wherever Python is, nothing is downloaded.
  files   local files through HF `datasets` (`text`, `json`/`jsonl`, `parquet`), given as
          comma-separated globs in `data.paths`; `data.text_field` names the text column.
  hub     a hub dataset by `data.hub_name` / `hub_config` / `hub_split`, streamed.
For local sources the HF offline switches are set, so no network request is made.

Tokenizers (`data.tokenizer`): 'byte' (UTF-8 bytes), a HF `tokenizers` .json file, or a
sentencepiece .model file; each has an end-of-document id.

Documents, each followed by the end-of-document id, are joined into one stream and cut into
rows of `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]). The train/eval split
(by document) and the shuffle of every epoch are functions of the seed. Every process builds
only its slice of each global batch, so the global batch does not depend on the number of
processes, and the iterator state (`state()` / `restore()`) is global too.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import logging
import math
import os
import pathlib
import queue
import sys
import sysconfig
import threading

import numpy as np

from moetrain.config import ConfigError

log = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})
EOD_TOKEN = '<|endoftext|>'  # the end-of-document token of tokenizers trained here.
# End-of-document tokens looked up, in this order, in a HF tokenizer's vocabulary.
EOD_CANDIDATES = (EOD_TOKEN, '</s>', '<eos>', '<|eos|>', '<|end_of_text|>')
COMPRESSION_SUFFIXES = ('.gz', '.bz2', '.xz', '.zst', '.lz4')
FORMAT_BY_SUFFIX = {'.txt': 'text', '.text': 'text', '.md': 'text', '.rst': 'text',
                    '.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
REPLACE_ERRORS = 'moetrain.count_replace'  # codec error handler: U+FFFD, counted.


# ---------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus an end-of-document id 256."""
  vocab_size = 257
  eod_id = 256

  def encode(self, text: str) -> np.ndarray:
    """int32 [T] ids of the text's UTF-8 bytes."""
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class HFTokenizer:
  """A HF `tokenizers` JSON file. Special tokens written in the text are encoded as plain
  text, so the end-of-document id appears only where documents end. Without one of
  EOD_CANDIDATES in the vocabulary, a fresh id after the vocabulary is the end of document."""

  def __init__(self, path: str):
    import tokenizers
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.tokenizer.encode_special_tokens = True
    vocab = self.tokenizer.get_vocab(with_added_tokens=True)
    size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    found = [vocab[t] for t in EOD_CANDIDATES if t in vocab]
    self.eod_id = found[0] if found else size
    self.vocab_size = max(size, self.eod_id + 1)

  def encode(self, text: str) -> np.ndarray:
    """int32 [T] token ids, without special tokens."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (tokenized in parallel by the Rust library)."""
    encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < size],
                                 skip_special_tokens=True)


class SentencePieceTokenizer:
  """A sentencepiece .model file; its eos id (or a fresh id after the vocabulary when the
  model has none) ends each document."""

  def __init__(self, path: str):
    import sentencepiece
    self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
    size = self.processor.get_piece_size()
    eos = self.processor.eos_id()
    self.eod_id = eos if eos >= 0 else size
    self.vocab_size = max(size, self.eod_id + 1)

  def encode(self, text: str) -> np.ndarray:
    """int32 [T] token ids, without bos/eos."""
    return np.asarray(self.processor.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.processor.encode(texts)]

  def decode(self, ids) -> str:
    size = self.processor.get_piece_size()
    return self.processor.decode([int(i) for i in ids if 0 <= int(i) < size])


def make_tokenizer(data_cfg):
  """The tokenizer named by data.tokenizer: 'byte', a .json (HF) or a .model (sentencepiece)."""
  name = data_cfg.tokenizer
  if name == 'byte':
    return ByteTokenizer()
  path = pathlib.Path(name)
  if path.suffix not in ('.json', '.model'):
    raise ConfigError(f"data.tokenizer={name!r} is not known; use 'byte', a HF tokenizers "
                      '.json file or a sentencepiece .model file.')
  if not path.is_file():
    raise ConfigError(f'data.tokenizer={name!r} does not exist; pass the path of a tokenizer '
                      "file (train one with `moetrain tokenizer train`) or use 'byte'.")
  try:
    return HFTokenizer(name) if path.suffix == '.json' else SentencePieceTokenizer(name)
  except Exception as e:  # the libraries raise bare Exception / RuntimeError on bad files.
    raise ConfigError(f'data.tokenizer={name!r} could not be read ({e}); pass a valid '
                      'tokenizer file.') from e


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
  """The model's vocabulary: the tokenizer's, rounded up to a multiple of 128."""
  return multiple * math.ceil(tokenizer_vocab / multiple)


def resolve_vocab(cfg):
  """Returns cfg with model.vocab_size filled in from the tokenizer when it is 0."""
  cfg = cfg.copy_and_resolve_references()
  vocab = make_tokenizer(cfg.data).vocab_size
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = padded_vocab_size(vocab)
  elif cfg.model.vocab_size < vocab:
    raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({vocab}); set it to 0 to follow the tokenizer.')
  return cfg


def train_tokenizer(cfg, vocab_size: int, output: str) -> HFTokenizer:
  """Trains a byte-level BPE with `vocab_size` tokens (EOD_TOKEN included) on the training
  split of the configured corpus, saves it as a HF tokenizers JSON file at `output`."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  if vocab_size < 257:
    raise ConfigError(f'--vocab_size={vocab_size} is too small for a byte-level BPE (256 '
                      'bytes + the end-of-document token); pass at least 257.')
  texts = load_documents(cfg.data)
  train_idx, _ = split_documents(len(texts), cfg.data.eval_fraction, cfg.seed)
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator((texts[i] for i in train_idx), trainer=trainer,
                                length=len(train_idx))
  pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(output))
  return HFTokenizer(str(output))


# ------------------------------------------------------------------------------- sources


class ReplacementCounter:
  """A codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

  def __init__(self):
    self.count = 0

  def __call__(self, error: UnicodeDecodeError):
    self.count += error.end - error.start
    return '\ufffd', error.end


_REPLACED = ReplacementCounter()
codecs.register_error(REPLACE_ERRORS, _REPLACED)


def log_replacements(before: int, where: str):
  """Logs how many undecodable bytes were replaced since the counter read `before`."""
  replaced = _REPLACED.count - before
  if replaced:
    log.warning('replaced %d undecodable (non-UTF-8) bytes in %s with U+FFFD', replaced, where)


def count_undecodable(path: str, chunk_bytes: int = 1 << 24) -> int:
  """Bytes of a file (gzip/bz2/xz decompressed; other compressions are not scanned) that
  are not valid UTF-8, counted in chunks."""
  import bz2
  import gzip
  import lzma
  opener = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open}.get(
      pathlib.Path(path).suffix.lower(), open)
  if path.lower().endswith(('.zst', '.lz4')):
    return 0
  before = _REPLACED.count
  decoder = codecs.getincrementaldecoder('utf-8')(errors=REPLACE_ERRORS)
  with opener(path, 'rb') as f:
    while chunk := f.read(chunk_bytes):
      decoder.decode(chunk)
  decoder.decode(b'', final=True)
  return _REPLACED.count - before


def set_offline():
  """Sets HF's offline switches (environment and, if already imported, the libraries' own
  constants), so loading local data makes no network request."""
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  os.environ['HF_HUB_OFFLINE'] = '1'
  os.environ['HF_UPDATE_DOWNLOAD_COUNTS'] = '0'
  if 'datasets' in sys.modules:
    sys.modules['datasets'].config.HF_DATASETS_OFFLINE = True
    sys.modules['datasets'].config.HF_HUB_OFFLINE = True
  if 'huggingface_hub' in sys.modules:
    sys.modules['huggingface_hub'].constants.HF_HUB_OFFLINE = True


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_documents(max_documents: int = 0) -> list[tuple[str, str]]:
  """(relative path, text) of the standard library's .py files, sorted by path.

  Test suites and site-packages are excluded; undecodable bytes become U+FFFD (counted).
  """
  root = stdlib_root()
  paths = sorted(p for p in root.rglob('*.py')
                 if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  if max_documents:
    paths = paths[:max_documents]
  before = _REPLACED.count
  docs = [(str(p.relative_to(root)), p.read_bytes().decode('utf-8', errors=REPLACE_ERRORS))
          for p in paths]
  log_replacements(before, f'the standard library ({root})')
  return docs


def expand_paths(paths: str) -> list[str]:
  """Files matched by comma-separated globs (`**` recurses), sorted, without duplicates."""
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise ConfigError("data.paths is empty; with data.source='files' set it to "
                      'comma-separated file globs, e.g. data.paths=corpus/*.jsonl.')
  files = []
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not matched:
      raise ConfigError(f'data.paths pattern {pattern!r} matches no file; fix the path or '
                        'the glob.')
    files += [m for m in matched if m not in files]
  return files


def file_format(files: list[str], fmt: str) -> str:
  """The HF builder ('text', 'json', 'parquet') for the files: data.format, or from the
  suffixes (after a compression suffix) when it is 'auto'."""
  if fmt != 'auto':
    return fmt
  found = set()
  for f in files:
    name = f.lower()
    for c in COMPRESSION_SUFFIXES:
      name = name.removesuffix(c)
    found.add(FORMAT_BY_SUFFIX.get(pathlib.Path(name).suffix, 'text'))
  if len(found) > 1:
    raise ConfigError(f'data.paths mixes formats ({", ".join(sorted(found))}); point it at '
                      'files of one format or set data.format.')
  return found.pop()


def _text_columns(ds, field: str, where: str):
  """Yields the `field` column of each batch of an iterable dataset, as lists of str."""
  for batch in ds.iter(batch_size=1024):
    if field not in batch:
      raise ConfigError(f'data.text_field={field!r} is not a column of {where} (columns: '
                        f'{", ".join(sorted(batch))}); set data.text_field to the text column.')
    yield [t for t in batch[field] if t]


def file_documents(d) -> list[str]:
  """Non-empty texts of the local files in data.paths, in file order (streamed: nothing is
  cached); undecodable bytes become U+FFFD (counted)."""
  from datasets import load_dataset
  files = expand_paths(d.paths)
  fmt = file_format(files, d.format)
  kwargs = {}
  if fmt in ('text', 'json'):
    # 'utf_8' (not 'utf-8') makes the json builder decode in Python, replacing bad bytes.
    kwargs = dict(encoding='utf_8', encoding_errors='replace')
    for f in files:
      if replaced := count_undecodable(f):
        log.warning('replaced %d undecodable (non-UTF-8) bytes in %s with U+FFFD', replaced, f)
  if fmt == 'text':
    kwargs['sample_by'] = d.sample_by
  try:
    ds = load_dataset(fmt, data_files=files, split='train', streaming=True, **kwargs)
    texts = []
    for column in _text_columns(ds, d.text_field, f'data.paths={d.paths!r}'):
      texts += column
      if d.max_documents and len(texts) >= d.max_documents:
        break
  except ConfigError:
    raise
  except Exception as e:  # malformed files: pyarrow / json errors of many types.
    raise ConfigError(f'data.paths={d.paths!r} could not be read as {fmt} ({type(e).__name__}:'
                      f' {e}); fix the files or set data.format.') from e
  return texts[:d.max_documents] if d.max_documents else texts


def hub_documents(d) -> list[str]:
  """Non-empty texts of a hub dataset split, streamed (the first data.max_documents when
  it is set, else the whole split)."""
  from datasets import load_dataset
  where = f'data.hub_name={d.hub_name!r}'
  try:
    ds = load_dataset(d.hub_name, d.hub_config or None, split=d.hub_split, streaming=True)
    texts = []
    for column in _text_columns(ds, d.text_field, where):
      texts += column
      if d.max_documents and len(texts) >= d.max_documents:
        break
  except ConfigError:
    raise
  except Exception as e:  # offline, unknown name/config/split: many exception types.
    raise ConfigError(f'{where} (config {d.hub_config!r}, split {d.hub_split!r}) could not '
                      f'be loaded ({type(e).__name__}: {e}); check the name and that this '
                      "machine is online, or use data.source='files'.") from e
  return texts[:d.max_documents] if d.max_documents else texts


def load_documents(d) -> list[str]:
  """The texts of the configured source, in a fixed order."""
  if d.source == 'stdlib':
    set_offline()
    texts = [text for _, text in stdlib_documents(d.max_documents)]
  elif d.source == 'files':
    set_offline()
    texts = file_documents(d)
  elif d.source == 'hub':
    texts = hub_documents(d)
  else:
    raise ConfigError(f"data.source={d.source!r} is not known; use 'stdlib', 'files' or "
                      "'hub'.")
  if not texts:
    raise ConfigError(f'data.source={d.source!r} gave no documents (empty files or text '
                      'column); point data.paths or data.hub_name at non-empty data.')
  return texts


# ------------------------------------------------------------------------------- packing


def split_documents(num_documents: int, eval_fraction: float, seed: int):
  """Deterministic split by document: (train indices, eval indices), a function of seed."""
  order = np.random.default_rng(seed).permutation(num_documents)
  num_eval = max(1, round(eval_fraction * num_documents))
  if num_eval >= num_documents:
    raise ConfigError(f'data.eval_fraction leaves no training documents out of '
                      f'{num_documents}; lower data.eval_fraction or add documents.')
  return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def pack(token_lists, eod_id: int, seq_len: int) -> np.ndarray:
  """Joins documents, each followed by eod_id, and cuts rows int32 [N, seq_len + 1].

  Consecutive rows share no tokens; the tail shorter than a row is dropped.
  """
  stream = np.concatenate([np.append(t, eod_id) for t in token_lists]).astype(np.int32)
  rows = len(stream) // (seq_len + 1)
  return stream[:rows * (seq_len + 1)].reshape(rows, seq_len + 1)


def document_starts(inputs_BL: np.ndarray, eod_id: int) -> np.ndarray:
  """bool [B, L]: where a document starts in each row (position 0, and after each eod)."""
  starts_BL = np.zeros(inputs_BL.shape, bool)
  starts_BL[:, 0] = True
  starts_BL[:, 1:] = inputs_BL[:, :-1] == eod_id
  return starts_BL


def segment_ids(inputs_BL: np.ndarray, eod_id: int) -> np.ndarray:
  """int32 [B, L]: 1 for a row's first document, +1 after each end-of-document token (the
  eod token belongs to the document it ends)."""
  return np.cumsum(document_starts(inputs_BL, eod_id), axis=1, dtype=np.int32)


def document_positions(inputs_BL: np.ndarray, eod_id: int) -> np.ndarray:
  """int32 [B, L]: position of each token within its document in the row (0 at each
  document start and at the row start)."""
  index_BL = np.broadcast_to(np.arange(inputs_BL.shape[1], dtype=np.int32), inputs_BL.shape)
  start_BL = np.maximum.accumulate(np.where(document_starts(inputs_BL, eod_id), index_BL, 0),
                                   axis=1)
  return (index_BL - start_BL).astype(np.int32)


def to_batch(rows: np.ndarray, eod_id: int | None = None,
             document_mask: bool = False) -> dict[str, np.ndarray]:
  """Rows [B, L + 1] -> inputs, targets [B, L] int32 and a float32 loss mask [B, L]; with
  document_mask also segment_ids and positions [B, L] int32 (attention stays within a
  document, positions restart at each document)."""
  inputs_BL = rows[:, :-1]
  batch = dict(inputs=inputs_BL, targets=rows[:, 1:],
               mask=np.ones(inputs_BL.shape, np.float32))
  if document_mask:
    batch['segment_ids'] = segment_ids(inputs_BL, eod_id)
    batch['positions'] = document_positions(inputs_BL, eod_id)
  return batch


# ----------------------------------------------------------------------------- iteration


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process `process_index` of `process_count` builds."""
  if batch_size % process_count:
    raise ConfigError(f'data.batch_size={batch_size} is not divisible by the '
                      f'{process_count} processes; choose a multiple of the process count.')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class Batches:
  """Endless batches of shuffled rows; the shuffle of each epoch is a function of seed.

  Each call returns this process's slice [batch_size / process_count, L] of the global
  batch. `state()` / `restore(state)` capture the global position, so a resumed run (with
  any number of processes) sees exactly the batches the uninterrupted run would have.
  """

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int, *, eod_id: int | None = None,
               document_mask: bool = False, process_index: int = 0, process_count: int = 1):
    if len(rows) < batch_size:
      raise ConfigError(f'the training split has {len(rows)} rows of data.seq_len tokens, '
                        f'fewer than data.batch_size={batch_size}; lower batch_size or '
                        'seq_len, or add documents.')
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    self.eod_id, self.document_mask = eod_id, document_mask
    self.local = process_slice(batch_size, process_index, process_count)
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order_N = -1, None

  def _order(self, epoch: int) -> np.ndarray:
    """int [N]: the row order of an epoch (cached for the current epoch)."""
    if epoch != self._order_epoch:
      self._order_N = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
      self._order_epoch = epoch
    return self._order_N

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index + self.batch_size > len(self.rows):
      self.epoch, self.index = self.epoch + 1, 0
    take = self._order(self.epoch)[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return to_batch(self.rows[take[self.local]], self.eod_id, self.document_mask)

  def state(self) -> dict:
    return dict(epoch=self.epoch, index=self.index, num_rows=len(self.rows))

  def restore(self, state: dict):
    if 'num_rows' in state and int(state['num_rows']) != len(self.rows):
      raise ConfigError(f'the saved data iterator ran over {state["num_rows"]} rows but this '
                        f'config gives {len(self.rows)}; resume with the data config the run '
                        'was started with.')
    self.epoch, self.index = int(state['epoch']), int(state['index'])


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


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical token distribution: the loss of the best
  model that ignores context, the bar a trained model must beat."""
  counts = np.bincount(tokens.reshape(-1)).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


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
  eval_unigram_entropy: float
  num_train_tokens: int


def make_data(cfg, process_index: int | None = None, process_count: int | None = None) -> Data:
  """Builds the training iterator and the fixed eval batches from the config.

  process_index / process_count default to jax's; every process builds the same rows and
  keeps its slice of each global batch.
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  d = cfg.data
  tokenizer = make_tokenizer(d)
  texts = load_documents(d)
  train_idx, eval_idx = split_documents(len(texts), d.eval_fraction, cfg.seed)
  encode = lambda idx: tokenizer.encode_batch([texts[i] for i in idx])
  train_rows = pack(encode(train_idx), tokenizer.eod_id, d.seq_len)
  eval_rows = pack(encode(eval_idx), tokenizer.eod_id, d.seq_len)
  batches = Batches(train_rows, d.batch_size, cfg.seed, eod_id=tokenizer.eod_id,
                    document_mask=d.document_mask, process_index=process_index,
                    process_count=process_count)
  if len(eval_rows) < d.batch_size:
    raise ConfigError(f'the eval split has {len(eval_rows)} rows, fewer than '
                      f'data.batch_size={d.batch_size}; raise data.eval_fraction, lower '
                      'batch_size or add documents.')
  eval_rows = eval_rows[:cfg.train.eval_batches * d.batch_size]
  global_eval = [eval_rows[i:i + d.batch_size]
                 for i in range(0, len(eval_rows) - d.batch_size + 1, d.batch_size)]
  eval_batches = [to_batch(rows[batches.local], tokenizer.eod_id, d.document_mask)
                  for rows in global_eval]
  targets = np.concatenate([rows[:, 1:] for rows in global_eval])
  return Data(Prefetch(batches, d.prefetch), eval_batches, tokenizer,
              unigram_entropy(targets), train_rows[:, 1:].size)
