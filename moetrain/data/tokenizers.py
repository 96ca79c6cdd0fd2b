"""Tokenizers: UTF-8 bytes, HF `tokenizers` .json files, sentencepiece .model files; the
model vocabulary that follows them; training a byte-level BPE on the configured corpus.

Each tokenizer has `vocab_size`, an end-of-document id `eod_id`, `encode`, `encode_batch`
and `decode`.
"""

from __future__ import annotations

import hashlib
import math
import pathlib

import numpy as np

from moetrain.config import ConfigError
from moetrain.data import sources
from moetrain.data.packing import split_documents

EOD_TOKEN = '<|endoftext|>'  # the end-of-document token of tokenizers trained here.
# End-of-document tokens looked up, in this order, in a HF tokenizer's vocabulary.
EOD_CANDIDATES = (EOD_TOKEN, '</s>', '<eos>', '<|eos|>', '<|end_of_text|>')


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
    """Token ids of each text (tokenized in parallel by the Rust library; without the
    character offsets, which `encode_batch_fast` skips: ~1.5x faster, the same ids)."""
    encode = getattr(self.tokenizer, 'encode_batch_fast', self.tokenizer.encode_batch)
    return [np.asarray(e.ids, np.int32) for e in encode(texts, add_special_tokens=False)]

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


def fingerprint(data_cfg, tokenizer) -> dict:
  """What identifies the tokenizer of data.tokenizer: its name, the sha256 of its file
  ('byte' for the byte tokenizer), its vocabulary size and end-of-document id."""
  name = data_cfg.tokenizer
  digest = 'byte'
  if name != 'byte':
    digest = hashlib.sha256(pathlib.Path(name).read_bytes()).hexdigest()
  return dict(name=name, sha256=digest, vocab_size=int(tokenizer.vocab_size),
              eod_id=int(tokenizer.eod_id))


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
  corpus = sources.open_corpus(cfg.data)
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

