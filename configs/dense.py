"""The dense baseline of configs/tiny.py: same attention, a SwiGLU FFN twice as wide, so
each token uses the same FFN parameters as the top-2 MoE (2 experts x 512)."""

from moetrain.config import default_config


def get_config():
  config = default_config()
  config.model.num_experts = 0
  config.model.d_ff = 1024
  return config
