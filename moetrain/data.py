"""Data: the embedded corpus, byte-level tokens, packing, a deterministic split and batches.

The embedded corpus is the Python standard library's own `.py` source (found through
`sysconfig`, test suites excluded), so every machine with Python has it and nothing is
downloaded. Documents are byte-level tokens plus an end-of-document id, joined into one
stream and cut into rows of `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sysconfig

import numpy as np

from moetrain.config import ConfigError

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus an end-of-document id 256."""
  vocab_size = 257
  eod_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
  """The model's vocabulary: the tokenizer's, rounded up to a multiple of 128."""
  return multiple * math.ceil(tokenizer_vocab / multiple)


def make_tokenizer(data_cfg):
  del data_cfg  # one tokenizer for now.
  return ByteTokenizer()


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


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_documents(max_documents: int = 0) -> list[tuple[str, str]]:
  """(relative path, text) of the standard library's .py files, sorted by path.

  Test suites and site-packages are excluded; undecodable bytes become U+FFFD.
  """
  root = stdlib_root()
  paths = sorted(p for p in root.rglob('*.py')
                 if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  if max_documents:
    paths = paths[:max_documents]
  return [(str(p.relative_to(root)), p.read_bytes().decode('utf-8', errors='replace'))
          for p in paths]


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


def to_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows [B, L + 1] -> inputs, targets [B, L] int32 and a float32 loss mask [B, L]."""
  return dict(inputs=rows[:, :-1], targets=rows[:, 1:],
              mask=np.ones(rows[:, 1:].shape, np.float32))


class Batches:
  """Endless batches of shuffled rows; the shuffle of each epoch is a function of seed.

  `state()` / `restore(state)` capture the position, so a resumed run sees exactly the
  batches the uninterrupted run would have.
  """

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
    if len(rows) < batch_size:
      raise ConfigError(f'the training split has {len(rows)} rows of data.seq_len tokens, '
                        f'fewer than data.batch_size={batch_size}; lower batch_size or '
                        'seq_len, or add documents.')
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    self.epoch, self.index = 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index + self.batch_size > len(self.rows):
      self.epoch, self.index = self.epoch + 1, 0
    take = self._order(self.epoch)[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return to_batch(self.rows[take])

  def state(self) -> dict:
    return dict(epoch=self.epoch, index=self.index)

  def restore(self, state: dict):
    self.epoch, self.index = int(state['epoch']), int(state['index'])


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical token distribution: the loss of the best
  model that ignores context, the bar a trained model must beat."""
  counts = np.bincount(tokens.reshape(-1)).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


@dataclasses.dataclass
class Data:
  train: Batches
  eval_batches: list  # fixed list of eval batches (dicts).
  tokenizer: ByteTokenizer
  eval_unigram_entropy: float
  num_train_tokens: int


def make_data(cfg) -> Data:
  """Builds the training iterator and the fixed eval batches from the config."""
  d = cfg.data
  if d.source != 'stdlib':
    raise ConfigError(f"data.source={d.source!r} is not known; use 'stdlib'.")
  tokenizer = make_tokenizer(d)
  docs = stdlib_documents(d.max_documents)
  train_idx, eval_idx = split_documents(len(docs), d.eval_fraction, cfg.seed)
  encode = lambda idx: [tokenizer.encode(docs[i][1]) for i in idx]
  train_rows = pack(encode(train_idx), tokenizer.eod_id, d.seq_len)
  eval_rows = pack(encode(eval_idx), tokenizer.eod_id, d.seq_len)
  need = cfg.train.eval_batches * d.batch_size
  if len(eval_rows) < d.batch_size:
    raise ConfigError(f'the eval split has {len(eval_rows)} rows, fewer than '
                      f'data.batch_size={d.batch_size}; raise data.eval_fraction.')
  eval_rows = eval_rows[:need]
  eval_batches = [to_batch(eval_rows[i:i + d.batch_size])
                  for i in range(0, len(eval_rows) - d.batch_size + 1, d.batch_size)]
  targets = np.concatenate([b['targets'] for b in eval_batches])
  return Data(Batches(train_rows, d.batch_size, cfg.seed), eval_batches, tokenizer,
              unigram_entropy(targets), train_rows[:, 1:].size)
