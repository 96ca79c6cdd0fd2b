"""Routing measures as pure NumPy functions of per-token routing decisions.

Shapes: N tokens, K experts chosen per token (best first), E experts, C categories.
An assignment is one (token, chosen expert) pair: a top-k router makes N * K of them.
"""

from __future__ import annotations

import numpy as np


def contingency(expert_NK: np.ndarray, category_N: np.ndarray, num_experts: int,
                num_categories: int) -> np.ndarray:
  """int64 [E, C]: assignments of tokens of category c to expert e. Tokens with category
  -1 are left out."""
  keep = category_N >= 0
  expert_A = expert_NK[keep].reshape(-1)
  category_A = np.repeat(category_N[keep], expert_NK.shape[1])
  counts = np.zeros((num_experts, num_categories), np.int64)
  np.add.at(counts, (expert_A, category_A), 1)
  return counts


def entropy(p: np.ndarray) -> float:
  """Entropy (nats) of a distribution given by non-negative weights."""
  p = p[p > 0] / np.sum(p)
  return float(-np.sum(p * np.log(p)))


def mutual_information(counts_XY: np.ndarray) -> float:
  """I(X; Y) in nats of the joint distribution proportional to counts_XY."""
  total = np.sum(counts_XY)
  if total == 0:
    return 0.0
  p_XY = counts_XY / total
  p_X1, p_1Y = p_XY.sum(1, keepdims=True), p_XY.sum(0, keepdims=True)
  nz = p_XY > 0
  return float(np.sum(p_XY[nz] * np.log(p_XY[nz] / (p_X1 @ p_1Y)[nz])))


def nmi(counts_XY: np.ndarray) -> float:
  """Normalized mutual information I(X; Y) / ((H(X) + H(Y)) / 2) (the arithmetic
  normalization, scikit-learn's default): 0 for independent variables, 1 when each
  determines the other; 0 when either is constant."""
  h_x, h_y = entropy(counts_XY.sum(1)), entropy(counts_XY.sum(0))
  if h_x == 0 or h_y == 0:
    return 0.0
  return max(0.0, mutual_information(counts_XY)) / ((h_x + h_y) / 2)


def random_router_nmi(expert_NK: np.ndarray, category_N: np.ndarray, num_experts: int,
                      num_categories: int, seed: int = 0, repeats: int = 5) -> float:
  """NMI of a random router with the same load: the tokens' expert choices shuffled
  across tokens (each expert keeps its count, each token K distinct experts), mean over
  `repeats` shuffles. What the NMI of an uninformed router is on this many tokens."""
  rng = np.random.default_rng(seed)
  return float(np.mean([
      nmi(contingency(expert_NK[rng.permutation(len(expert_NK))], category_N, num_experts,
                      num_categories)) for _ in range(repeats)]))


def top_tokens(expert_NK: np.ndarray, ids_N: np.ndarray, num_experts: int,
               count: int = 8) -> list[list[tuple[int, int]]]:
  """Per expert, its `count` most frequent token ids as (id, assignments), most first
  (ties: the smaller id)."""
  out = []
  for e in range(num_experts):
    ids, n = np.unique(np.broadcast_to(ids_N[:, None], expert_NK.shape)[expert_NK == e],
                       return_counts=True)
    order = np.lexsort((ids, -n))[:count]
    out.append([(int(ids[i]), int(n[i])) for i in order])
  return out


def cross_layer(top1_N: np.ndarray, next_top1_N: np.ndarray, num_experts: int) -> dict:
  """How well a token's top-1 expert in one layer predicts its top-1 in the next.

  accuracy: the share of tokens whose next-layer expert is the most frequent one among
    tokens with the same expert here (the best mapping expert -> next expert);
  chance: the same with no knowledge of this layer (the most frequent next expert's
    share), the accuracy of the best constant guess;
  nmi: normalized mutual information of the two choices.
  """
  counts = np.zeros((num_experts, num_experts), np.int64)
  np.add.at(counts, (top1_N, next_top1_N), 1)
  total = max(int(counts.sum()), 1)
  return dict(accuracy=float(counts.max(1).sum() / total),
              chance=float(counts.sum(0).max() / total), nmi=nmi(counts))
