"""Switch Transformer routing (Fedus et al. 2021): top-1, capacity factor 1.25, router jitter.

Same tiny model as configs/tiny.py; only the router changes, so runs compare directly.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  e = config.model.moe
  e.top_k = 1
  e.capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.jitter = 0.01
  return config
