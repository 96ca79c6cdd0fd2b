"""tiktoken as the encoder of a byte-level BPE during prepare (data.bpe_encoder='tiktoken').

A HF `tokenizers` byte-level BPE of the kind `moetrain tokenizer train` writes (BPE model,
ByteLevel pre-tokenizer with GPT-2's split pattern, no normalizer) is the same tokenizer as
a tiktoken `Encoding` whose ranks are its token ids: tiktoken merges the adjacent pair whose
joined bytes have the lowest rank, and a BPE learned by merging pairs in order gives each
merged token the next id. A whole `prepare` takes 3.5x fewer CPU-seconds with it
(bench/data_scale.py). The equality is checked again on the first documents of every batch
encoded: a difference is a ConfigError.
"""

from __future__ import annotations

import json

import numpy as np

from moetrain.config import ConfigError

# GPT-2's pre-tokenizer pattern: the split HF's ByteLevel pre-tokenizer applies (use_regex).
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")
CHECKED_DOCUMENTS = 4  # per batch: encoded by both libraries and compared.
FIX = "set data.bpe_encoder='tokenizers'"


def byte_of_char() -> dict[str, int]:
  """GPT-2's printable stand-in character of each byte (as in HF ByteLevel) -> the byte."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  chars = printable + [256 + n for n in range(len(others))]
  return {chr(c): b for c, b in zip(chars, printable + others)}


def incompatibility(spec: dict) -> str | None:
  """Why the tokenizer JSON `spec` is not a plain byte-level BPE that tiktoken reproduces,
  or None."""
  model, pre = spec.get('model') or {}, spec.get('pre_tokenizer') or {}
  if model.get('type') != 'BPE':
    return f"its model is {model.get('type')!r}, not BPE"
  if any(model.get(k) for k in ('dropout', 'continuing_subword_prefix', 'end_of_word_suffix',
                                 'byte_fallback')):
    return 'its BPE uses dropout, subword prefixes/suffixes or byte fallback'
  if spec.get('normalizer'):
    return 'it has a normalizer'
  if (pre.get('type') != 'ByteLevel' or pre.get('add_prefix_space')
      or not pre.get('use_regex', True)):
    return 'its pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)'
  return None


def ranks_of(vocab: dict[str, int]) -> dict[bytes, int]:
  """The byte string of each token of a byte-level BPE vocabulary (GPT-2 characters
  decoded) -> its id."""
  table = byte_of_char()
  return {bytes(table[c] for c in token): i for token, i in vocab.items()}


class TiktokenBPE:
  """Encodes like `hf` (a tokenizers.HFTokenizer of the file at `path`) through tiktoken.
  Raises ConfigError when tiktoken is missing or the file is not a plain byte-level BPE."""

  def __init__(self, hf, path: str):
    try:
      import tiktoken
    except ImportError as e:
      raise ConfigError("data.bpe_encoder='tiktoken' needs the tiktoken package; pip install "
                        f"'moetrain[tiktoken]' or {FIX}.") from e
    with open(path, encoding='utf-8') as f:
      spec = json.load(f)
    if why := incompatibility(spec):
      raise ConfigError(f"data.bpe_encoder='tiktoken' cannot encode data.tokenizer={path!r} "
                        f'({why}); {FIX}.')
    self.hf, self.path = hf, path
    added = {t['content'] for t in spec.get('added_tokens', [])}  # plain text here.
    vocab = {t: i for t, i in spec['model']['vocab'].items() if t not in added}
    self.encoding = tiktoken.Encoding('moetrain-bpe', pat_str=GPT2_PATTERN,
                                      mergeable_ranks=ranks_of(vocab), special_tokens={})
    self.eod_id, self.vocab_size = hf.eod_id, hf.vocab_size

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (special tokens written in the text are plain text, as in
    HFTokenizer); the first CHECKED_DOCUMENTS are compared with the HF encoding."""
    ids = self.encoding.encode_ordinary_batch(texts, num_threads=1)
    for text, got, want in zip(texts, ids, self.hf.encode_batch(texts[:CHECKED_DOCUMENTS])):
      if not np.array_equal(np.asarray(got), want):
        raise ConfigError(f"data.bpe_encoder='tiktoken' encodes {text[:40]!r} differently "
                          f'from tokenizers with data.tokenizer={self.path!r}; {FIX}.')
    return [np.asarray(i, np.int32) for i in ids]
