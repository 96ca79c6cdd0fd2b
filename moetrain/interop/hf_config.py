"""Hugging Face `config.json` <-> moetrain model config, and which transformers class holds
a moetrain model exactly.

Families (config.json `model_type`, the class `AutoModelForCausalLM` builds):
  llama      LlamaForCausalLM       dense models (mistral, MistralForCausalLM, likewise)
  mixtral    MixtralForCausalLM     every layer MoE; combine weights = softmax over the
                                    top-k logits (topk_softmax, or softmax_topk renormalized)
  qwen3_moe  Qwen3MoeForCausalLM    softmax then top-k (`norm_topk_prob` = renormalize),
                                    dense layers anywhere, q/k RMSNorm per head (qk_norm)
  qwen2_moe  Qwen2MoeForCausalLM    as qwen3_moe without q/k norms, plus one shared expert
                                    gated by a sigmoid, optional q/k/v biases
DeepSeek-V3 (sigmoid gates with a correction bias) is refused: its multi-head latent
attention is not moetrain's attention.

transformers is never imported here: export and import need only the JSON and
safetensors; transformers is what reads the files afterwards.
"""

from __future__ import annotations

import ml_collections

from moetrain import config as config_lib

ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'mixtral': 'MixtralForCausalLM',
    'qwen3_moe': 'Qwen3MoeForCausalLM',
    'qwen2_moe': 'Qwen2MoeForCausalLM',
}
FORMATS = ('auto',) + tuple(ARCHITECTURES)
DENSE = ('llama', 'mistral')  # the same layout; mistral only where a run came from one.

MLA = ('DeepSeek-V3 computes attention with multi-head latent attention (keys and values '
       'from an RMS-normalized low-rank latent, one rotary key shared by all heads), which '
       "moetrain's grouped-query attention cannot express")


def combine_weights_sum_to_one(moe_cfg) -> bool:
  """Whether the k combine weights of a softmax router always sum to one."""
  return moe_cfg.softmax_order == 'topk_softmax' or moe_cfg.renormalize


def choose_family(model_cfg) -> str:
  """The family that holds this model (or 'deepseek_v3' for sigmoid gates, refused)."""
  m, e = model_cfg, model_cfg.moe
  if m.num_experts == 0:
    return 'llama'
  if e.gate == 'sigmoid':
    return 'deepseek_v3'
  if e.num_shared_experts:
    return 'qwen2_moe'
  if m.qk_norm:
    return 'qwen3_moe'
  return 'mixtral'


def export_problems(model_cfg, family: str) -> tuple[list[str], list[str]]:
  """(refusals, differences) for exporting this model as `family`.

  A refusal is a model the family cannot hold at all; a difference is a model it holds
  whose transformers outputs differ from moetrain's (exported only when asked). Each is
  one clause: what differs and the key that fixes it.
  """
  m, e = model_cfg, model_cfg.moe
  refuse, differ = [], []
  if family == 'deepseek_v3' or (m.num_experts and e.gate == 'sigmoid'):
    refuse.append(f'model.moe.gate=sigmoid is DeepSeek-V3 routing, and {MLA}; use '
                  "gate='softmax' to export as Mixtral or Qwen-MoE")
    return refuse, differ
  moe_family = family not in DENSE
  if bool(m.num_experts) != moe_family:
    refuse.append(f'{family} is a {"MoE" if moe_family else "dense"} architecture and this '
                  f'model has model.num_experts={m.num_experts}; use --format=auto')
    return refuse, differ
  if m.qk_norm and family != 'qwen3_moe':
    refuse.append(f'model.qk_norm=True needs per-head q/k norms, which {family} lacks; use '
                  '--format=qwen3_moe')
  if family == 'qwen3_moe' and not m.qk_norm:
    refuse.append('Qwen3-MoE normalizes each query and key head; set model.qk_norm=True '
                  '(or export as mixtral)')
  if m.qkv_bias and family != 'qwen2_moe':
    refuse.append(f'model.qkv_bias=True needs q/k/v biases, which {family} lacks; use '
                  '--format=qwen2_moe')
  if not moe_family:
    return refuse, differ
  layers = config_lib.moe_layers(m)
  if family == 'mixtral' and len(layers) != m.num_layers:
    refuse.append(f'Mixtral has a MoE in every layer, this model only in layers {layers}; '
                  'set model.first_k_dense=0 and model.moe_every=1, or model.qk_norm=True '
                  'for Qwen3-MoE')
  if family in ('mixtral', 'qwen3_moe') and e.num_shared_experts:
    refuse.append(f'{family} has no shared experts; export with --format=qwen2_moe')
  if family == 'qwen2_moe':
    if not e.num_shared_experts:
      refuse.append('Qwen2-MoE has a shared expert in every MoE layer; set '
                    'model.moe.num_shared_experts >= 1 (or export as mixtral or qwen3_moe)')
    elif not e.shared_expert_gate:
      refuse.append('Qwen2-MoE scales its shared expert by a sigmoid gate; set '
                    'model.moe.shared_expert_gate=True')
  if e.router != 'token_choice':
    differ.append(f"router={e.router!r}: transformers sends every token to its top-{e.top_k} "
                  'experts (token choice)')
  if e.router == 'token_choice' and not e.dropless and (
      e.eval_capacity_factor * e.top_k < m.num_experts):
    differ.append(f'model.moe.eval_capacity_factor={e.eval_capacity_factor} drops '
                  'assignments beyond ceil(cf * tokens * k / E) per expert at eval, '
                  'transformers never drops (set model.moe.dropless=True for an exact export)')
  if family == 'mixtral' and not combine_weights_sum_to_one(e):
    differ.append('Mixtral renormalizes the top-k weights to sum to one and this model does '
                  'not (set model.moe.renormalize=True, or model.qk_norm=True for Qwen3-MoE)')
  if e.routed_scaling != 1.0:
    differ.append(f'model.moe.routed_scaling={e.routed_scaling} is not applied by transformers')
  if e.bias_update_rate > 0:
    differ.append('the selection biases of aux-loss-free balancing '
                  '(model.moe.bias_update_rate) are not applied by transformers')
  return refuse, differ


def _rope(model_cfg) -> dict:
  return dict(rope_type='default', rope_theta=float(model_cfg.rope_theta))


def to_hf_config(cfg, family: str, *, eos_token_id=None, base: dict | None = None) -> dict:
  """The config.json of `cfg` (a resolved moetrain config) as `family`.

  `base`: a config.json this run was imported from; its keys moetrain does not model
  (max_position_embeddings, bos/eos ids, ...) are kept, every key below is rewritten.
  """
  m, e = cfg.model, cfg.model.moe
  out = dict(base) if base else dict(
      max_position_embeddings=cfg.data.seq_len, initializer_range=m.init_std,
      bos_token_id=None, eos_token_id=eos_token_id, use_cache=True)
  out.update(
      architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=m.vocab_size,
      hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim or m.d_model // m.num_heads,
      hidden_act='silu', rms_norm_eps=m.norm_eps, rope_parameters=_rope(m),
      rope_theta=float(m.rope_theta), tie_word_embeddings=m.tie_embeddings,
      dtype=m.param_dtype, attention_dropout=0.0)
  expert_width = e.d_expert or m.d_ff
  if family == 'llama':
    out.update(intermediate_size=m.d_ff, attention_bias=False, mlp_bias=False)
  elif family == 'mistral':
    out.update(intermediate_size=m.d_ff, sliding_window=None)
  elif family == 'mixtral':
    out.update(intermediate_size=expert_width, num_local_experts=m.num_experts,
               num_experts_per_tok=e.top_k, router_jitter_noise=0.0, sliding_window=None)
  else:
    dense = sorted(set(range(m.num_layers)) - set(config_lib.moe_layers(m)))
    out.update(intermediate_size=m.d_ff, moe_intermediate_size=expert_width,
               num_experts=m.num_experts, num_experts_per_tok=e.top_k,
               norm_topk_prob=combine_weights_sum_to_one(e), decoder_sparse_step=1,
               mlp_only_layers=dense, use_sliding_window=False, sliding_window=None)
    if family == 'qwen3_moe':
      out.update(attention_bias=False)
    else:
      out.update(qkv_bias=m.qkv_bias,
                 shared_expert_intermediate_size=expert_width * e.num_shared_experts)
  return out


class ImportRefused(config_lib.ConfigError):
  """A config.json moetrain cannot reproduce exactly; the message says why."""


def _refuse(ok: bool, message: str):
  if not ok:
    raise ImportRefused(message)


def _layer_pattern(moe: set[int], num_layers: int) -> tuple[int, int]:
  """(first_k_dense, moe_every) whose MoE layers are exactly `moe`."""
  for every in range(1, num_layers + 1):
    for first in range(num_layers + 1):
      model = ml_collections.ConfigDict(dict(num_experts=1, num_layers=num_layers,
                                             first_k_dense=first, moe_every=every))
      if set(config_lib.moe_layers(model)) == moe:
        return first, every
  raise ImportRefused(f'the MoE layers {sorted(moe)} of this model follow no pattern of '
                      'model.first_k_dense and model.moe_every, so moetrain cannot build it.')


def from_hf_config(hf: dict, cfg) -> tuple[str, ml_collections.ConfigDict]:
  """(family, cfg with every model key set from config.json `hf`). Routing becomes the
  exact, dropless equivalent of the family's. model.param_dtype and model.dtype stay
  `cfg`'s: training choices (weights are cast; bfloat16 to float32 is exact). Raises
  ImportRefused for what moetrain cannot reproduce exactly."""
  kind = hf.get('model_type', '')
  _refuse(kind != 'deepseek_v3', f'{MLA}, so this DeepSeek-V3 model cannot be imported.')
  family = kind
  _refuse(family in ARCHITECTURES, f'model_type {kind!r} is not one moetrain imports; it '
          f'reads {", ".join(sorted(ARCHITECTURES))}.')
  cfg = cfg.copy_and_resolve_references()
  m, e = cfg.model, cfg.model.moe
  _refuse(hf.get('hidden_act', 'silu') == 'silu', f'hidden_act={hf.get("hidden_act")!r}: '
          'moetrain feed-forwards are SwiGLU (silu) only.')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  _refuse(rope.get('rope_type', rope.get('type', 'default')) == 'default',
          f'rope type {rope.get("rope_type", rope.get("type"))!r} is not the default rotary '
          'embedding moetrain uses.')
  _refuse(not hf.get('sliding_window') or hf.get('use_sliding_window') is False,
          f'sliding_window={hf.get("sliding_window")}: moetrain has no sliding-window '
          'attention.')
  _refuse(not hf.get('attention_bias') and not hf.get('mlp_bias'), 'attention_bias/mlp_bias '
          'adds biases moetrain does not have (it has q/k/v biases only, Qwen2).')
  m.vocab_size = hf['vocab_size']
  m.d_model = hf['hidden_size']
  m.num_layers = hf['num_hidden_layers']
  m.num_heads = hf['num_attention_heads']
  m.num_kv_heads = hf.get('num_key_value_heads') or m.num_heads
  head_dim = hf.get('head_dim') or m.d_model // m.num_heads
  m.head_dim = 0 if head_dim * m.num_heads == m.d_model else head_dim
  m.norm_eps = float(hf.get('rms_norm_eps', 1e-6))
  m.rope_theta = float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  m.tie_embeddings = bool(hf.get('tie_word_embeddings', False))
  m.qk_norm = family == 'qwen3_moe'
  m.qkv_bias = family == 'qwen2_moe' and bool(hf.get('qkv_bias', True))
  m.d_ff = hf['intermediate_size']
  e.router, e.gate, e.dropless, e.jitter = 'token_choice', 'softmax', True, 0.0
  e.routed_scaling, e.bias_update_rate = 1.0, 0.0
  e.d_expert, e.num_shared_experts, e.shared_expert_gate = 0, 0, False
  m.first_k_dense, m.moe_every = 0, 1
  if family in DENSE:
    m.num_experts = 0
  elif family == 'mixtral':
    m.num_experts = hf.get('num_local_experts', 8)
    e.top_k = hf.get('num_experts_per_tok', 2)
    e.softmax_order, e.renormalize = 'topk_softmax', False
  else:
    m.num_experts = hf.get('num_experts', hf.get('num_local_experts', 0))
    step = hf.get('decoder_sparse_step', 1)
    skip = set(hf.get('mlp_only_layers') or [])
    moe = {i for i in range(m.num_layers)
           if m.num_experts > 0 and i not in skip and (i + 1) % step == 0}
    if not moe:
      m.num_experts = 0
    else:
      m.first_k_dense, m.moe_every = _layer_pattern(moe, m.num_layers)
      e.top_k = hf.get('num_experts_per_tok', 1)
      e.softmax_order, e.renormalize = 'softmax_topk', bool(hf.get('norm_topk_prob', False))
      width = hf['moe_intermediate_size']
      e.d_expert = 0 if width == m.d_ff else width
      shared = hf.get('shared_expert_intermediate_size', 0) if family == 'qwen2_moe' else 0
      _refuse(shared % width == 0, f'shared_expert_intermediate_size={shared} is not a '
              f'multiple of moe_intermediate_size={width}, as moetrain shared experts are.')
      e.num_shared_experts = shared // width
      e.shared_expert_gate = bool(shared)
  return family, config_lib.validate(cfg)
