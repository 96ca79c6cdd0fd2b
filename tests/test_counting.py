"""Parameter and FLOP counts against Mixtral's published figures and hand formulas."""

import math
import pathlib

import pytest

from moetrain import config as config_lib
from moetrain import counting

from conftest import tiny_config

CONFIGS = pathlib.Path(__file__).parents[1] / 'configs'


def hand_count(m, seq_len):
  """(total, active, flops/token) written out from the architecture, layer by layer."""
  d, hd = m.d_model, m.d_model // m.num_heads
  attention = d * m.num_heads * hd * 2 + d * m.num_kv_heads * hd * 2
  norms = 2 * d
  moe = set(config_lib.moe_layers(m))
  f_e = m.moe.d_expert or m.d_ff
  total = active = 0
  for i in range(m.num_layers):
    total += attention + norms
    active += attention + norms
    if i in moe:
      routed = m.num_experts * 3 * d * f_e
      other = d * m.num_experts + 3 * d * f_e * m.moe.num_shared_experts
      total += routed + other
      active += other + 3 * d * f_e * m.moe.top_k
    else:
      total += 3 * d * m.d_ff
      active += 3 * d * m.d_ff
  embeddings = m.vocab_size * d * (1 if m.tie_embeddings else 2)
  total += embeddings + d
  active += embeddings + d
  matmul = active - (m.num_layers * norms + d) - (0 if m.tie_embeddings else m.vocab_size * d)
  return total, active, 6 * matmul + 12 * m.num_layers * seq_len * d


def test_mixtral_matches_published_sizes():
  cfg = config_lib.load(CONFIGS / 'mixtral_8x7b.py')
  c = counting.count(cfg)
  assert abs(c.total / 46.7e9 - 1) < 0.01, c.total
  assert abs(c.active / 12.9e9 - 1) < 0.01, c.active
  assert (c.total, c.active, c.flops_per_token) == hand_count(cfg.model, cfg.data.seq_len)


@pytest.mark.parametrize('name,overrides', [
    ('dense', {'model.num_experts': 0}),
    ('top2', {}),
    ('shared', {'model.moe.num_shared_experts': 2}),
    ('fine_grained', {'model.num_experts': 16, 'model.moe.d_expert': 16,
                      'model.moe.top_k': 4}),
    ('first_k_dense', {'model.num_layers': 3, 'model.first_k_dense': 1}),
    ('moe_every', {'model.num_layers': 4, 'model.moe_every': 2}),
    ('sigmoid_bias', {'model.moe.gate': 'sigmoid', 'model.moe.bias_update_rate': 1e-3,
                      'model.moe.num_shared_experts': 1, 'model.moe.d_expert': 16}),
    ('untied', {'model.tie_embeddings': False}),
])
def test_count_matches_hand_formula(name, overrides):
  cfg = tiny_config(**{'model.vocab_size': 384, **overrides})
  c = counting.count(config_lib.validate(cfg))
  assert (c.total, c.active, c.flops_per_token) == hand_count(cfg.model, cfg.data.seq_len), name


def test_router_bias_is_state_not_a_parameter():
  base = tiny_config(**{'model.vocab_size': 384, 'model.moe.gate': 'sigmoid'})
  with_bias = tiny_config(**{'model.vocab_size': 384, 'model.moe.gate': 'sigmoid',
                             'model.moe.bias_update_rate': 1e-3})
  assert counting.count(base).total == counting.count(with_bias).total


def test_expert_choice_and_soft_active_share():
  ec = tiny_config(**{'model.vocab_size': 384, 'model.moe.router': 'expert_choice',
                      'model.moe.capacity_factor': 1.5})
  soft = tiny_config(**{'model.vocab_size': 384, 'model.moe.router': 'soft'})
  dense_e = tiny_config(**{'model.vocab_size': 384, 'model.moe.top_k': 4})
  m = ec.model
  per_expert = 3 * m.d_model * m.d_ff * m.num_layers
  top2 = counting.count(tiny_config(**{'model.vocab_size': 384})).active
  assert counting.count(ec).active == top2 + round(per_expert * (2 * 1.5 - 2))
  assert counting.count(soft).active == counting.count(dense_e).active
  assert math.isclose(counting.experts_per_token(ec.model), 3.0)
