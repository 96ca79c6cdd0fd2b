"""Packing: the train/eval split by document, documents joined and cut into rows, segment
ids and positions for document masking, the batch dict, the unigram entropy."""

from __future__ import annotations

import numpy as np

from moetrain.config import ConfigError
from moetrain.data import shuffle

SPLIT_TAG = 0x5EED  # keys the split apart from the other uses of the seed.


def is_eval_document(doc_ids, eval_fraction: float, seed: int) -> np.ndarray:
  """bool [...]: whether each document (its number in the source's order) is held out for
  eval: a keyed uniform of (seed, number) below eval_fraction. Each document is decided
  alone, so a streamed source is split without being counted first."""
  return shuffle.uniform(shuffle.hash_ints(seed, SPLIT_TAG), doc_ids) < eval_fraction


def split_documents(num_documents: int, eval_fraction: float, seed: int):
  """Deterministic split by document: (train indices, eval indices), a function of seed."""
  held_out = is_eval_document(np.arange(num_documents), eval_fraction, seed)
  if held_out.all():
    raise ConfigError(f'data.eval_fraction leaves no training documents out of '
                      f'{num_documents}; lower data.eval_fraction or add documents.')
  return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def join_documents(token_lists, eod_id: int, dtype=np.int32) -> np.ndarray:
  """[sum(len + 1)]: the documents' tokens, each followed by eod_id, as one array."""
  lengths = np.fromiter((len(t) for t in token_lists), np.int64, len(token_lists))
  ends = np.cumsum(lengths + 1)
  stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
  stream[ends - 1] = eod_id
  for tokens, start, length in zip(token_lists, ends - lengths - 1, lengths):
    stream[start:start + length] = tokens
  return stream


def pack(token_lists, eod_id: int, seq_len: int) -> np.ndarray:
  """Joins documents, each followed by eod_id, and cuts rows int32 [N, seq_len + 1].

  Consecutive rows share no tokens; the tail shorter than a row is dropped.
  """
  stream = join_documents(token_lists, eod_id)
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


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical token distribution: the loss of the best
  model that ignores context, the bar a trained model must beat."""
  counts = np.bincount(tokens.reshape(-1)).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())

