"""The default: a tiny 8-expert top-2 MoE LM on the standard library's source (CPU, minutes)."""

from moetrain.config import default_config


def get_config():
  config = default_config()
  return config
