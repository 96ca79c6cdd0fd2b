"""GShard routing (Lepikhin et al. 2020): top-2, capacity factor 2.0, the two gates
renormalized to sum to one, overflow dropped in position order."""

from moetrain.config import default_config


def get_config():
  config = default_config()
  e = config.model.moe
  e.top_k = 2
  e.capacity_factor = 2.0
  e.eval_capacity_factor = 2.0
  e.renormalize = True
  e.drop_order = 'position'
  return config
