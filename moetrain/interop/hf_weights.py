"""Name and layout mapping between moetrain parameters and Hugging Face tensors.

Both sides are flat dicts of NumPy arrays: moetrain keys as in `moetrain.interop.params`
('blocks.0.attn.w_q'), HF keys as in the hub checkpoints of each family (one tensor per
expert, `experts.3.w1.weight` for Mixtral, `experts.3.gate_proj.weight` for Qwen, the
layout transformers' `save_pretrained` writes and `from_pretrained` converts on load).
torch `Linear` weights are [out, in]; moetrain kernels are [in, out] with heads split out:

  w_q [D, H, K]    <->  q_proj.weight [H*K, D]      (k, v likewise with G heads)
  w_o [H, K, D]    <->  o_proj.weight [D, H*K]
  b_q [H, K]       <->  q_proj.bias [H*K]
  w_gate [E, D, F] <->  E x gate_proj.weight [F, D]  (up likewise; down [E, F, D] <-> [D, F])
  router [D, E]    <->  gate.weight [E, D]
  unembed [D, V]   <->  lm_head.weight [V, D]

Every transform is a transpose or reshape, so both directions are exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moetrain import config as config_lib


@dataclasses.dataclass(frozen=True)
class Entry:
  """One moetrain parameter and the HF tensors that hold it."""
  ours: str
  theirs: tuple[str, ...]
  to_hf: Callable  # array -> tuple of arrays, one per name in `theirs`
  from_hf: Callable  # tuple of arrays -> array


def _copy(ours, theirs):
  return Entry(ours, (theirs,), lambda x: (x,), lambda ys: ys[0])


def _linear(ours, theirs):
  """A 2-d kernel [in, out] <-> torch Linear weight [out, in]."""
  return Entry(ours, (theirs,), lambda x: (x.T,), lambda ys: ys[0].T)


def _heads_in(ours, theirs, heads: int, head_dim: int):
  """[D, H, K] <-> [H*K, D]."""
  return Entry(ours, (theirs,), lambda x: (x.reshape(x.shape[0], -1).T,),
               lambda ys: ys[0].T.reshape(-1, heads, head_dim))


def _heads_out(ours, theirs, heads: int, head_dim: int):
  """[H, K, D] <-> [D, H*K]."""
  return Entry(ours, (theirs,), lambda x: (x.reshape(heads * head_dim, -1).T,),
               lambda ys: ys[0].T.reshape(heads, head_dim, -1))


def _bias(ours, theirs, heads: int, head_dim: int):
  """[H, K] <-> [H*K]."""
  return Entry(ours, (theirs,), lambda x: (x.reshape(-1),),
               lambda ys: ys[0].reshape(heads, head_dim))


def _experts(ours, theirs: tuple[str, ...]):
  """[E, in, out] <-> E torch Linear weights [out, in]."""
  return Entry(ours, theirs, lambda x: tuple(w.T for w in x),
               lambda ys: np.stack([y.T for y in ys]))


EXPERT_NAMES = {  # moetrain expert weight -> the family's per-expert name
    'mixtral': {'w_gate': 'w1', 'w_up': 'w3', 'w_down': 'w2'},
    'qwen': {'w_gate': 'gate_proj', 'w_up': 'up_proj', 'w_down': 'down_proj'},
}


def layout(model_cfg, family: str) -> list[Entry]:
  """Every parameter of a moetrain model of `model_cfg` and where `family` keeps it."""
  m, e = model_cfg, model_cfg.moe
  heads, kv, head_dim = m.num_heads, m.num_kv_heads, m.head_dim or m.d_model // m.num_heads
  moe_layers = set(config_lib.moe_layers(m))
  block = 'block_sparse_moe' if family == 'mixtral' else 'mlp'
  names = EXPERT_NAMES['mixtral' if family == 'mixtral' else 'qwen']
  out = [_copy('embed', 'model.embed_tokens.weight'),
         _copy('final_norm.scale', 'model.norm.weight')]
  if not m.tie_embeddings:
    out.append(_linear('unembed', 'lm_head.weight'))
  for i in range(m.num_layers):
    ours, theirs = f'blocks.{i}.', f'model.layers.{i}.'
    out += [_copy(ours + 'attn_norm.scale', theirs + 'input_layernorm.weight'),
            _copy(ours + 'ffn_norm.scale', theirs + 'post_attention_layernorm.weight')]
    for name, n in (('q', heads), ('k', kv), ('v', kv)):
      out.append(_heads_in(f'{ours}attn.w_{name}', f'{theirs}self_attn.{name}_proj.weight', n,
                           head_dim))
      if m.qkv_bias:
        out.append(_bias(f'{ours}attn.b_{name}', f'{theirs}self_attn.{name}_proj.bias', n,
                         head_dim))
    out.append(_heads_out(ours + 'attn.w_o', theirs + 'self_attn.o_proj.weight', heads,
                          head_dim))
    if m.qk_norm:
      out += [_copy(ours + 'attn.q_norm.scale', theirs + 'self_attn.q_norm.weight'),
              _copy(ours + 'attn.k_norm.scale', theirs + 'self_attn.k_norm.weight')]
    if i not in moe_layers:
      out += [_linear(f'{ours}ffn.{w}', f'{theirs}mlp.{p}.weight')
              for w, p in EXPERT_NAMES['qwen'].items()]
      continue
    out.append(_linear(ours + 'ffn.router', f'{theirs}{block}.gate.weight'))
    out += [_experts(f'{ours}ffn.{w}', tuple(f'{theirs}{block}.experts.{j}.{p}.weight'
                                             for j in range(m.num_experts)))
            for w, p in names.items()]
    if e.num_shared_experts:
      out += [_linear(f'{ours}ffn.shared.{w}', f'{theirs}mlp.shared_expert.{p}.weight')
              for w, p in EXPERT_NAMES['qwen'].items()]
      if e.shared_expert_gate:
        out.append(_linear(ours + 'ffn.shared_gate', theirs + 'mlp.shared_expert_gate.weight'))
  return out


class LayoutError(config_lib.ConfigError):
  """Tensors that do not fit the expected layout; the message names them."""


def to_hf(params: dict[str, np.ndarray], model_cfg, family: str) -> dict[str, np.ndarray]:
  """moetrain flat parameters -> HF tensors (C-contiguous), in layer order."""
  entries = layout(model_cfg, family)
  extra = sorted(set(params) - {entry.ours for entry in entries})
  if extra:
    raise LayoutError(f'the run has parameters no {family} tensor holds '
                      f'({", ".join(extra[:4])}); export a model built by this version of '
                      'moetrain.')
  out = {}
  for entry in entries:
    for name, array in zip(entry.theirs, entry.to_hf(params[entry.ours])):
      out[name] = np.ascontiguousarray(array)
  return out


def from_hf(tensors: dict[str, np.ndarray], model_cfg, family: str,
            ignore: tuple[str, ...] = ('rotary_emb.inv_freq',)) -> dict[str, np.ndarray]:
  """HF tensors -> moetrain flat parameters. A missing tensor, or one moetrain would drop
  (other than names ending in `ignore`), raises LayoutError."""
  entries = layout(model_cfg, family)
  wanted = {name for entry in entries for name in entry.theirs}
  if model_cfg.tie_embeddings and 'lm_head.weight' in tensors and np.array_equal(
      tensors['lm_head.weight'], tensors.get('model.embed_tokens.weight')):
    wanted.add('lm_head.weight')  # a tied head some checkpoints store anyway.
  missing = sorted(wanted - set(tensors))
  if missing:
    raise LayoutError(f'the checkpoint lacks {len(missing)} tensors a {family} model of this '
                      f'config.json has ({", ".join(missing[:3])}); it is incomplete or in '
                      'another layout.')
  extra = sorted(k for k in set(tensors) - wanted if not k.endswith(ignore))
  if extra:
    raise LayoutError(f'the checkpoint has tensors moetrain has no place for '
                      f'({", ".join(extra[:3])}), so importing would change the model.')
  return {entry.ours: np.ascontiguousarray(entry.from_hf(tuple(tensors[n]
                                                              for n in entry.theirs)))
          for entry in entries}
