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

The train/eval split is by document and a function of the seed. Training documents are
dealt round-robin to data.batch_size row streams (stream j feeds row j of every global batch);
each stream joins its documents, each followed by the end-of-document id, and cuts the result
into rows of `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]), visited in a seeded
order per (seed, stream, epoch). Each process reads, tokenizes and packs only the documents of
its streams (its slice of the batch rows), so the global batch does not depend on the number
of processes, and the iterator state (`state()` / `restore()`, the global step) is global too.
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
from collections.abc import Callable, Sequence

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
  corpus = open_corpus(cfg.data)
  train_idx, _ = split_documents(corpus.num_documents, cfg.data.eval_fraction, cfg.seed)
  train_texts = corpus.read(train_idx)
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
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


def open_binary(path: str):
  """The file opened for reading bytes, gzip/bz2/xz decompressed; None for compressions
  read only by HF datasets (.zst, .lz4)."""
  import bz2
  import gzip
  import lzma
  if path.lower().endswith(('.zst', '.lz4')):
    return None
  opener = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open}.get(
      pathlib.Path(path).suffix.lower(), open)
  return opener(path, 'rb')


def count_undecodable(path: str, chunk_bytes: int = 1 << 24) -> int:
  """Bytes of a file (gzip/bz2/xz decompressed; other compressions are not scanned) that
  are not valid UTF-8, counted in chunks."""
  f = open_binary(path)
  if f is None:
    return 0
  before = _REPLACED.count
  decoder = codecs.getincrementaldecoder('utf-8')(errors=REPLACE_ERRORS)
  with f:
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


def stdlib_paths(max_documents: int = 0) -> list[pathlib.Path]:
  """The standard library's .py files (test suites and site-packages excluded), sorted; the
  first max_documents when it is set. Lists only: no file is read."""
  root = stdlib_root()
  paths = sorted(p for p in root.rglob('*.py')
                 if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  return paths[:max_documents] if max_documents else paths


def read_text_file(path: pathlib.Path) -> str:
  """A file's text; undecodable bytes become U+FFFD (counted)."""
  return path.read_bytes().decode('utf-8', errors=REPLACE_ERRORS)


def read_stdlib(paths: list[pathlib.Path]) -> list[str]:
  """The texts of the given standard library files, in order (replacements logged)."""
  before = _REPLACED.count
  texts = [read_text_file(p) for p in paths]
  log_replacements(before, f'the standard library ({stdlib_root()})')
  return texts


def stdlib_documents(max_documents: int = 0) -> list[tuple[str, str]]:
  """(relative path, text) of the standard library's .py files, sorted by path."""
  root, paths = stdlib_root(), stdlib_paths(max_documents)
  return [(str(p.relative_to(root)), t) for p, t in zip(paths, read_stdlib(paths))]


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
  """Yields the `field` column of each batch of an iterable dataset, as lists of str
  (null and empty values left out; any other non-text value is a ConfigError)."""
  rows = 0
  for batch in ds.iter(batch_size=1024):
    if field not in batch:
      raise ConfigError(f'data.text_field={field!r} is not a column of {where} (columns: '
                        f'{", ".join(sorted(batch))}); set data.text_field to the text column.')
    for i, t in enumerate(batch[field]):
      if t is not None and not isinstance(t, str):
        raise ConfigError(f'data.text_field={field!r} holds {type(t).__name__} {t!r:.40} '
                          f'instead of text in row {rows + i + 1} of {where}; fix that row or '
                          'set data.text_field to a text column.')
    rows += len(batch[field])
    yield [t for t in batch[field] if t]


def check_json_lines(path: str):
  """Raises ConfigError naming the file and line of the first line of a JSON-lines file
  that is not an object (a bare `null` as the first line crashes the json reader of HF
  datasets outright). Files holding one JSON array are left to the reader."""
  f = open_binary(path)
  if f is None:
    return
  with f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if number == 1 and line.startswith(b'['):
        return
      if line and not line.startswith(b'{'):
        shown = line[:40].decode(errors='replace')
        raise ConfigError(f'{path} line {number} is not a JSON object ({shown!r}); make every '
                          'line an object with the data.text_field key, or drop it.')


def _first_texts(ds, d, where: str):
  """Yields the non-empty texts of a dataset one by one, the first data.max_documents when
  it is set."""
  count = 0
  for column in _text_columns(ds, d.text_field, where):
    for text in column:
      yield text
      count += 1
      if d.max_documents and count >= d.max_documents:
        return


def file_texts(d):
  """A function that streams the non-empty texts of the local files in data.paths, in file
  order (nothing is cached); undecodable bytes become U+FFFD (counted, logged here once)."""
  files = expand_paths(d.paths)
  fmt = file_format(files, d.format)
  kwargs = {}
  if fmt in ('text', 'json'):
    # 'utf_8' (not 'utf-8') makes the json builder decode in Python, replacing bad bytes.
    kwargs = dict(encoding='utf_8', encoding_errors='replace')
    for f in files:
      if replaced := count_undecodable(f):
        log.warning('replaced %d undecodable (non-UTF-8) bytes in %s with U+FFFD', replaced, f)
      if fmt == 'json':
        check_json_lines(f)
  if fmt == 'text':
    kwargs['sample_by'] = d.sample_by

  def texts():
    from datasets import load_dataset
    try:
      ds = load_dataset(fmt, data_files=files, split='train', streaming=True, **kwargs)
      yield from _first_texts(ds, d, f'data.paths={d.paths!r}')
    except ConfigError:
      raise
    except Exception as e:  # malformed files: pyarrow / json errors of many types.
      raise ConfigError(f'data.paths={d.paths!r} could not be read as {fmt} '
                        f'({type(e).__name__}: {e}); fix the files or set data.format.') from e

  return texts


def hub_texts(d):
  """A function that streams the non-empty texts of a hub dataset split (the first
  data.max_documents when it is set, else the whole split)."""
  where = f'data.hub_name={d.hub_name!r}'

  def texts():
    from datasets import load_dataset
    try:
      ds = load_dataset(d.hub_name, d.hub_config or None, split=d.hub_split, streaming=True)
      yield from _first_texts(ds, d, where)
    except ConfigError:
      raise
    except Exception as e:  # offline, unknown name/config/split: many exception types.
      raise ConfigError(f'{where} (config {d.hub_config!r}, split {d.hub_split!r}) could '
                        f'not be loaded ({type(e).__name__}: {e}); check the name and that '
                        "this machine is online, or use data.source='files'.") from e

  return texts


def select_streamed(texts, indices) -> list[str]:
  """The texts at `indices` (any order) of the stream `texts()`, in the order of `indices`;
  only those are kept, and the stream stops after the last one."""
  wanted = set(int(i) for i in indices)
  found = {}
  if wanted:
    last = max(wanted)
    for i, text in enumerate(texts()):
      if i in wanted:
        found[i] = text
      if i >= last:
        break
  return [found[int(i)] for i in indices]


@dataclasses.dataclass
class Corpus:
  """The documents of a source: how many there are, and `read(indices)` -> the texts of
  only those documents (in the order of `indices`)."""
  num_documents: int
  read: Callable[[Sequence[int]], list[str]]


def open_corpus(d) -> Corpus:
  """The configured source's documents, counted in a fixed order without keeping texts:
  stdlib lists its files; files/hub stream the records once to count them (reading then
  streams them again, keeping only the selected texts)."""
  if d.source == 'stdlib':
    set_offline()
    paths = stdlib_paths(d.max_documents)
    corpus = Corpus(len(paths), lambda indices: read_stdlib([paths[i] for i in indices]))
  elif d.source in ('files', 'hub'):
    if d.source == 'files':
      set_offline()
    texts = file_texts(d) if d.source == 'files' else hub_texts(d)
    count = sum(1 for _ in texts())
    corpus = Corpus(count, lambda indices: select_streamed(texts, indices))
  else:
    raise ConfigError(f"data.source={d.source!r} is not known; use 'stdlib', 'files' or "
                      "'hub'.")
  if not corpus.num_documents:
    raise ConfigError(f'data.source={d.source!r} gave no documents (empty files or text '
                      'column); point data.paths or data.hub_name at non-empty data.')
  return corpus


def load_documents(d) -> list[str]:
  """All texts of the configured source, in a fixed order."""
  corpus = open_corpus(d)
  return corpus.read(range(corpus.num_documents))


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


def deal_streams(train_idx: np.ndarray, num_streams: int) -> list[np.ndarray]:
  """Deals the (sorted) training documents round-robin: stream j owns train_idx[j::S]."""
  return [train_idx[j::num_streams] for j in range(num_streams)]


def epoch_order(seed: int, stream: int, epoch: int, num_rows: int) -> np.ndarray:
  """int [n]: the order in which stream `stream` visits its rows in `epoch`."""
  return np.random.default_rng([seed, stream, epoch]).permutation(num_rows)


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
  eval_unigram_entropy: float  # of the global eval targets (the same in every process).
  num_train_tokens: int  # target tokens in the rows of THIS process's streams.


def pack_streams(token_lists: dict, streams_docs: list[np.ndarray], eod_id: int,
                 seq_len: int) -> list[np.ndarray]:
  """Packs each stream's documents (ids -> token arrays in token_lists) into its rows
  int32 [n_j, seq_len + 1]."""
  return [pack([token_lists[int(i)] for i in docs], eod_id, seq_len) for docs in streams_docs]


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
  corpus = open_corpus(d)
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
