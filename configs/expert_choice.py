"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens with
C = capacity_factor * tokens * top_k / experts; a token may get zero or several experts.
Capacity factor 2 with top_k 1 gives each token two experts on average (EC-CF2)."""

from moetrain.config import default_config


def get_config():
  config = default_config()
  e = config.model.moe
  e.router = 'expert_choice'
  e.top_k = 1
  e.capacity_factor = 2.0
  e.eval_capacity_factor = 2.0
  return config
