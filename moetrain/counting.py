"""Parameter and FLOP counts from shapes alone (`nnx.eval_shape`: nothing is allocated).

Active parameters per token: every parameter except the routed experts, plus the routed
experts' share a token uses: K of E for token choice, K * capacity_factor of E on
average for expert choice, all of them for soft routing. Embeddings (both tables when
untied) count, as in Mixtral's published 12.9B active of 46.7B.

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):
  6 * N_matmul + 12 * num_layers * seq_len * d_model
N_matmul is the active parameters that multiply activations: all active parameters but the
input embedding lookup (when tied, the shared table counts once, as the output projection)
and the norm scales. The second term is the attention score and value products, not
halved for the causal mask.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from flax import nnx

from moetrain.model.transformer import Transformer

EXPERT_WEIGHTS = ('w_gate', 'w_up', 'w_down')


@dataclasses.dataclass
class Counts:
  total: int
  active: int
  matmul_active: int
  flops_per_token: float
  by_group: dict

  def lines(self) -> list[str]:
    out = [f'total parameters        {self.total:>18,}  ({_short(self.total)})',
           f'active per token        {self.active:>18,}  ({_short(self.active)})',
           f'training FLOPs / token  {self.flops_per_token:>18,.0f}  '
           f'({_short(self.flops_per_token)} FLOP)']
    out += [f'  {name:<21} {n:>18,}' for name, n in sorted(self.by_group.items())]
    return out


def _short(n: float) -> str:
  """46702792704 -> '46.703B', 6542464 -> '6.542M'."""
  for unit, size in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= size:
      return f'{n / size:.3f}{unit}'
  return f'{n:.0f}'


def _group(path: tuple, ndim: int) -> str:
  """The parameter group of a weight; routed expert weights are the [E, ...] stacks."""
  names = [str(p) for p in path]
  if names[0] in ('embed', 'unembed', 'final_norm'):
    return names[0]
  if 'ffn' in names:
    if names[-1] in EXPERT_WEIGHTS and 'shared' not in names and ndim == 3:
      return 'routed_experts'
    if 'shared' in names or names[-1] == 'shared_gate':
      return 'shared_experts'
    if names[-1] in ('router', 'bias'):
      return 'router'
    return 'dense_ffn'
  if 'attn' in names and names[-1] != 'scale':  # q_norm/k_norm scales are norms.
    return 'attention'
  return 'norms'


def experts_per_token(model_cfg) -> float:
  """How many routed experts a token uses on average."""
  e = model_cfg.moe
  if e.router == 'soft':
    return float(model_cfg.num_experts)
  if e.router == 'expert_choice':
    return e.top_k * e.capacity_factor
  return float(e.top_k)


def count(cfg, seq_len: int | None = None) -> Counts:
  """Counts for a resolved config (model.vocab_size set)."""
  m = cfg.model
  # Counted on the unscanned layout (the same parameters; paths name one layer each).
  unscanned = ml_collections.ConfigDict(m.to_dict())
  unscanned.scan_layers = False
  model = nnx.eval_shape(lambda: Transformer(unscanned, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  by_group: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(params):
    shape = leaf.get_value().shape
    group = _group(path, len(shape))
    by_group[group] = by_group.get(group, 0) + int(np.prod(shape))
  total = sum(by_group.values())
  routed = by_group.get('routed_experts', 0)
  active = total - routed
  if m.num_experts:
    active += round(routed * experts_per_token(m) / m.num_experts)
  norms = by_group.get('norms', 0) + by_group.get('final_norm', 0)
  input_embedding = by_group['embed'] if not m.tie_embeddings else 0
  matmul_active = active - norms - input_embedding
  seq_len = seq_len or cfg.data.seq_len
  flops = 6 * matmul_active + 12 * m.num_layers * seq_len * m.d_model
  return Counts(total, active, matmul_active, float(flops), by_group)
