"""Starting a run from another run's parameters: a plain warm start, or sparse upcycling
(Komatsuzaki et al. 2022) of a dense model into a MoE.

Upcycling: every expert of a MoE layer starts as a copy of the source's dense SwiGLU
feed-forward of that layer; the router keeps its fresh init (std model.init_std, so
logits start small); everything else is copied. With identical experts, any combine
weights that sum to one (`renormalize`, or `topk_softmax`) and no dropped tokens, the MoE
computes exactly the dense model's function at step 0.

Both functions map flat dicts (`moetrain.interop.params`) and raise ConfigError with one
sentence naming the first parameter that does not fit.
"""

from __future__ import annotations

import numpy as np

from moetrain.config import ConfigError

EXPERT_WEIGHTS = ('w_gate', 'w_up', 'w_down')
FRESH = ('router',)  # MoE parameters a dense model has no counterpart for.


def _shape(x) -> str:
  return 'x'.join(map(str, x.shape)) or 'scalar'


def warm_start_params(source_params: dict, fresh_params: dict, *, source: str = '') -> dict:
  """Every parameter from `source_params`; names and shapes must equal `fresh_params`'s."""
  fix = ('use the same model keys as that run (or init.upcycle=True to turn a dense run '
         'into a MoE).')
  for key in sorted(set(source_params) | set(fresh_params)):
    ours, theirs = fresh_params.get(key), source_params.get(key)
    if theirs is None:
      raise ConfigError(f'init.from_workdir={source} has no parameter {key}, which this '
                        f'config builds ({_shape(ours)}); {fix}')
    if ours is None:
      raise ConfigError(f'init.from_workdir={source}: its parameter {key} has no place in '
                        f'this config; {fix}')
    if ours.shape != theirs.shape:
      raise ConfigError(f'init.from_workdir={source}: parameter {key} is {_shape(theirs)} '
                        f'there but this config builds {_shape(ours)}; {fix}')
  return {key: theirs.astype(fresh_params[key].dtype) for key, theirs in source_params.items()}


def _is_routed_expert(key: str) -> bool:
  """Whether `key` is a routed expert stack (blocks.N.ffn.w_gate|w_up|w_down): in a dense
  source the same name is the layer's dense kernel."""
  parts = key.split('.')
  return (len(parts) == 4 and parts[0] == 'blocks' and parts[2] == 'ffn'
          and parts[3] in EXPERT_WEIGHTS)


def upcycle_params(source_params: dict, fresh_params: dict, *, source: str = '') -> dict:
  """Upcycled parameters: a MoE expert stack [E, ...] takes E copies of the source's dense
  kernel of the same name [...]; the router of a layer whose
  source feed-forward is dense stays fresh; every other parameter is copied and must have
  the same shape."""
  out = {}
  for key, ours in fresh_params.items():
    theirs = source_params.get(key)
    layer_ffn = key.rsplit('.', 1)[0]
    if theirs is not None and theirs.shape == ours.shape:
      out[key] = theirs.astype(ours.dtype)
    elif theirs is not None and _is_routed_expert(key) and ours.shape[1:] == theirs.shape:
      out[key] = np.broadcast_to(theirs.astype(ours.dtype), ours.shape).copy()
    elif theirs is None and key.rsplit('.', 1)[-1] in FRESH and (
        f'{layer_ffn}.w_gate' in source_params):
      out[key] = ours
    else:
      has = f'{_shape(theirs)}' if theirs is not None else 'no such parameter'
      raise ConfigError(
          f'init.upcycle from {source}: this config builds {key} as {_shape(ours)}, but '
          f'the source has {has}; keep every non-expert key equal to the dense run\'s (d_model, '
          'layers, heads, vocabulary, model.moe.d_expert=0 or its d_ff, no shared experts).')
  unused = sorted(set(source_params) - set(out))
  if unused:
    raise ConfigError(f'init.upcycle from {source}: the source parameter {unused[0]} has no '
                      'place in this config; use the same model keys as the dense run.')
  return out
