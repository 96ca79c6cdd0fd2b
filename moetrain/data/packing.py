"""Packing: the train/eval split by document, documents joined and cut into rows, segment
ids and positions for document masking, the batch dict, the unigram entropy."""

from __future__ import annotations

import numpy as np

from moetrain.config import ConfigError


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


def deal_streams(train_idx: np.ndarray, num_streams: int) -> list[np.ndarray]:
  """Deals the (sorted) training documents round-robin: stream j owns train_idx[j::S]."""
  return [train_idx[j::num_streams] for j in range(num_streams)]


def epoch_order(seed: int, stream: int, epoch: int, num_rows: int) -> np.ndarray:
  """int [n]: the order in which stream `stream` visits its rows in `epoch`."""
  return np.random.default_rng([seed, stream, epoch]).permutation(num_rows)


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical token distribution: the loss of the best
  model that ignores context, the bar a trained model must beat."""
  counts = np.bincount(tokens.reshape(-1)).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def pack_streams(token_lists: dict, streams_docs: list[np.ndarray], eod_id: int,
                 seq_len: int) -> list[np.ndarray]:
  """Packs each stream's documents (ids -> token arrays in token_lists) into its rows
  int32 [n_j, seq_len + 1]."""
  return [pack([token_lists[int(i)] for i in docs], eod_id, seq_len) for docs in streams_docs]

