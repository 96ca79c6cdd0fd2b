"""Helpers of the data tests: small corpora, configs that read them, and plain-Python
references (integer arithmetic and loops) of the split, the row order and the mixture."""

import json
import math

import numpy as np

from moetrain.data import loader, mixture, packing

M64 = (1 << 64) - 1
WORDS = ('the expert router sends each token to two of eight experts while a shared '
         'attention layer mixes tokens within a document and the loss counts every '
         'prediction café naïve').split()


def make_texts(num_docs: int, seed: int = 0, max_words: int = 60) -> list[str]:
  """num_docs pseudo-English documents of 5..max_words words (some non-ASCII)."""
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, rng.integers(5, max_words))) for _ in range(num_docs)]


def write_jsonl(path, texts, field='text'):
  path.write_text(''.join(json.dumps({field: t, 'id': i}) + '\n' for i, t in enumerate(texts)))
  return path


def files_config(tiny, paths, **overrides):
  """A tiny config reading local files."""
  return tiny(**{'data.source': 'files', 'data.paths': str(paths), 'data.max_documents': 0,
                 'data.seq_len': 16, 'data.batch_size': 4, 'data.eval_fraction': 0.2,
                 'train.eval_batches': 2, **overrides})


def mix64_reference(x: int) -> int:
  """splitmix64's finalizer in Python integers."""
  z = (x + 0x9E3779B97F4A7C15) & M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
  return z ^ (z >> 31)


def hash_reference(*values: int) -> int:
  h = 0
  for v in values:
    h = mix64_reference(h ^ (v & M64))
  return h


def uniform_reference(key: int, index: int) -> float:
  return (mix64_reference(mix64_reference(index) ^ key) >> 11) * 2.0**-53


def permute_reference(index: int, n: int, key: int) -> int:
  """One index through a 6-round Feistel network with cycle walking, in Python integers."""
  half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  keys = [mix64_reference(key ^ r) for r in range(6)]

  def feistel(x):
    left, right = x >> half, x & mask
    for k in keys:
      left, right = right, left ^ (mix64_reference(right ^ k) & mask)
    return (left << half) | right

  x = feistel(index)
  while x >= n:
    x = feistel(x)
  return x


def is_eval_reference(k: int, eval_fraction: float, seed: int) -> bool:
  return uniform_reference(hash_reference(seed, packing.SPLIT_TAG), k) < eval_fraction


def packed_reference(token_lists, eod_id, seq_len):
  """Python loop: one stream of tokens with eod after each document, cut into rows."""
  stream = []
  for tokens in token_lists:
    stream += [int(t) for t in tokens] + [eod_id]
  width = seq_len + 1
  return [stream[i:i + width] for i in range(0, len(stream) - width + 1, width)]


def batches_reference(token_lists, seed, eval_fraction, seq_len, batch_size, steps, eod_id):
  """Python loop of the single-directory design: hold out documents by the keyed uniform,
  pack the rest into rows, give row slot k of step t the row permute(n mod N, N,
  key(seed, 0, n // N)) with n = t * batch_size + k. Returns (batches as row lists, rows)."""
  train = [t for k, t in enumerate(token_lists) if not is_eval_reference(k, eval_fraction, seed)]
  rows = packed_reference(train, eod_id, seq_len)
  batches = []
  for t in range(steps):
    batch = []
    for k in range(batch_size):
      epoch, i = divmod(t * batch_size + k, len(rows))
      batch.append(rows[permute_reference(i, len(rows),
                                          hash_reference(seed, loader.ROW_TAG, 0, epoch))])
    batches.append(batch)
  return batches, rows


def mixture_reference(num_rows: int, weights, seed: int) -> list[tuple[int, int]]:
  """Python loop of the chain of two-way splits with running counters: (component,
  position) of each global row 0 .. num_rows - 1."""
  total = sum(weights)
  w = [x / total for x in weights]
  k = len(w)
  p = [w[c] / sum(w[c:]) for c in range(k - 1)]
  b = [uniform_reference(hash_reference(seed, mixture.MIXTURE_TAG), c) for c in range(k - 1)]
  reached, given, out = [0] * (k - 1), [0] * k, []
  for _ in range(num_rows):
    chosen = k - 1
    for c in range(k - 1):
      m = reached[c]
      reached[c] += 1
      if math.floor((m + 1) * p[c] + b[c]) > math.floor(m * p[c] + b[c]):
        chosen = c
        break
    out.append((chosen, given[chosen]))
    given[chosen] += 1
  return out


def batch_rows(batch):
  """A batch dict -> its rows as lists (inputs + the last target)."""
  return [i.tolist() + [int(t[-1])] for i, t in zip(batch['inputs'], batch['targets'])]


def segments_reference(row, eod_id):
  """Python loop: (segment ids, positions) of one input row."""
  seg, pos, ids, positions = 1, 0, [], []
  for j, token in enumerate(row):
    if j > 0 and row[j - 1] == eod_id:
      seg, pos = seg + 1, 0
    ids.append(seg)
    positions.append(pos)
    pos += 1
  return ids, positions
