"""DeepSeek-V3-style MoE (DeepSeek-AI 2024): sigmoid gates normalized over the chosen
experts with a routed scaling factor, one always-active shared expert, fine-grained routed
experts (4x as many, each 1/4 the width, top-4 of 32), aux-loss-free bias balancing with a
small sequence-wise balance loss, and a dense first layer.

Active FFN width per token: shared 128 + 4 x 128 routed = 640 vs 2 x 512 in configs/tiny.py.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.num_experts = 32
  m.first_k_dense = 1
  e = m.moe
  e.gate = 'sigmoid'
  e.renormalize = True
  e.routed_scaling = 2.5
  e.top_k = 4
  e.d_expert = 128
  e.num_shared_experts = 1
  e.dropless = True
  e.bias_update_rate = 1e-3
  e.balance_coef = 1e-4
  e.balance_scope = 'sequence'
  return config
