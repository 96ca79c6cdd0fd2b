"""Mixtral 8x7B's shapes (Jiang et al. 2024): 46.7B total, 12.9B active parameters.

For `moetrain params`; training it needs a pod (see the README's multi-host section).
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 32000
  m.num_layers = 32
  m.d_model = 4096
  m.num_heads = 32
  m.num_kv_heads = 8
  m.d_ff = 14336
  m.num_experts = 8
  m.tie_embeddings = False
  m.rope_theta = 1e6
  m.norm_eps = 1e-5
  m.dtype = 'bfloat16'
  m.moe.top_k = 2
  m.moe.softmax_order = 'topk_softmax'
  m.moe.dropless = True
  config.data.seq_len = 4096
  return config
