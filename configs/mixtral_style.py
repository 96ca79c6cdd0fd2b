"""Mixtral-style routing (Jiang et al. 2024): softmax over the top-2 logits, dropless.

The tiny model of configs/tiny.py; configs/mixtral_8x7b.py has the real shapes.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  e = config.model.moe
  e.top_k = 2
  e.softmax_order = 'topk_softmax'
  e.dropless = True
  return config
