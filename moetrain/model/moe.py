"""The MoE feed-forward layer (nnx): E routed SwiGLU experts, optional shared experts, and
the router biases of aux-loss-free balancing. The math is `moetrain.model.moe_ffn`; the
mesh-aware call (shard_map, all-to-all) is `moetrain.model.moe_parallel.run_moe_ffn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.model.layers import MLP, param
from moetrain.model import moe_parallel
from moetrain.model.moe_ffn import MoESpec, token_choices


class RouterBias(nnx.Variable):
  """Per-expert selection bias of aux-loss-free balancing; not trained by the optimizer."""


class MoE(nnx.Module):
  """MoE feed-forward [B, L, D] -> [B, L, D]: E routed SwiGLU experts plus optional
  always-active shared experts, whose output `moe.shared_expert_gate` scales per token by
  sigmoid(x @ shared_gate) (shared_gate [D, 1], Qwen2-MoE). Returns the output and the
  layer's statistics; at eval they also hold `expert_TK` int32 [B * L, K], each token's
  routed experts before capacity (`moe_ffn.token_choices`; computed only where read).
  `spec` holds the layer's routing and expert settings (`moe_ffn.layer_specs`)."""

  def __init__(self, model_cfg, spec: MoESpec, *, rngs: nnx.Rngs, dtype, param_dtype):
    e = model_cfg.moe
    d, n = model_cfg.d_model, model_cfg.num_experts
    f = e.d_expert or model_cfg.d_ff
    self.spec = spec
    self.router = param(rngs, (d, n), ('embed', None), std=model_cfg.init_std)
    w_in, w_out = moe_parallel.EXPERT_IN_AXES, moe_parallel.EXPERT_OUT_AXES
    self.w_gate = param(rngs, (n, d, f), w_in, fan_in=d, dtype=param_dtype)
    self.w_up = param(rngs, (n, d, f), w_in, fan_in=d, dtype=param_dtype)
    self.w_down = param(rngs, (n, f, d), w_out, fan_in=f, dtype=param_dtype)
    self.bias = RouterBias(jnp.zeros((n,), jnp.float32)) if e.bias_update_rate > 0 else None
    self.shared = (MLP(d, f * e.num_shared_experts, rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype) if e.num_shared_experts else None)
    self.shared_gate = (param(rngs, (d, 1), ('embed', None), fan_in=d, dtype=param_dtype)
                        if e.num_shared_experts and e.shared_expert_gate else None)
    self.dtype = dtype

  def __call__(self, x_BLD, *, train: bool, rng=None):
    batch, length, d = x_BLD.shape
    if rng is None:
      rng = jax.random.key(0)
    bias_E = self.bias[...] if self.bias is not None else None
    y_TD, stats = moe_parallel.run_moe_ffn(
        x_BLD.reshape(batch * length, d), self.router[...], self.w_gate[...],
        self.w_up[...], self.w_down[...], bias_E, rng, spec=self.spec, seq_len=length,
        train=train, dtype=self.dtype)
    if not train:
      stats = dict(stats, expert_TK=token_choices(x_BLD.reshape(batch * length, d),
                                                  self.router[...], bias_E, self.spec))
    y_BLD = y_TD.reshape(batch, length, d).astype(self.dtype)
    if self.shared is not None:
      shared_BLD = self.shared(x_BLD)
      if self.shared_gate is not None:
        gate_BL1 = x_BLD.astype(self.dtype) @ self.shared_gate[...].astype(self.dtype)
        shared_BLD = shared_BLD * jax.nn.sigmoid(gate_BL1)
      y_BLD = y_BLD + shared_BLD
    return y_BLD, stats
