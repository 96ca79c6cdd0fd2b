"""Bench configs: one function per config, each returning a validated ConfigDict.

All share the non-FFN part (2 layers, heads of 64 with 2 query heads per key-value head,
vocab 2048, sequences of 256 tokens, float32) so that step-time ratios isolate the
feed-forward. Default width d_model 512 and batch 32 (8192 tokens per step); `bench/run.py
--d-model=256 --batch-size=8` is the quick small variant (see NOTES.md for both).
The MoE configs use k=2 experts of hidden size 2 d_model, so a token's active expert
parameters equal the dense FFN's (d_ff = k * d_expert = 4 d_model).
Capacity factor 1.0: R4 is defined at 1.0, and at 1.0 the padded expert compute equals the
dense FFN's (at 1.25 the experts do 25% more matmul work by construction).
"""

from __future__ import annotations

from moetrain import config as config_lib

VOCAB = 2048


D_MODEL = 512  # bench/run.py --d-model changes it; heads of 64, d_ff = 4 d, d_expert = 2 d.
BATCH_SIZE = 32  # bench/run.py --batch-size changes it (sequences of 256 tokens).
DTYPE = 'float32'  # bench/run.py --dtype changes it (bfloat16 on GPU/TPU by default).


def base(**overrides):
  c = config_lib.default_config()
  m = c.model
  m.vocab_size = VOCAB
  m.d_model = D_MODEL
  m.num_layers = 2
  m.num_heads = D_MODEL // 64
  m.num_kv_heads = D_MODEL // 128
  m.d_ff = 4 * D_MODEL
  m.num_experts = 0
  m.moe.top_k = 2
  m.moe.d_expert = 2 * D_MODEL
  m.moe.capacity_factor = 1.0
  m.dtype = DTYPE
  c.data.seq_len = 256
  c.data.batch_size = BATCH_SIZE
  c.train.steps = 1000
  c.train.warmup_steps = 10
  for key, value in overrides.items():
    config_lib.set_key(c, key, value)
  return config_lib.validate(c)


def dense():
  """Dense SwiGLU FFN with d_ff = k * d_expert: the same active parameters as moe8/moe64."""
  return base()


def moe8():
  return base(**{'model.num_experts': 8})


def moe64():
  return base(**{'model.num_experts': 64})


def drop_ragged():
  """moe8 without drops, as `jax.lax.ragged_dot` grouped matmuls (GPU/TPU's default)."""
  return base(**{'model.num_experts': 8, 'model.moe.dropless': True,
                 'model.moe.dropless_impl': 'ragged'})


def drop_padded():
  """moe8 without drops, as padded buffers of capacity T per expert (CPU's default)."""
  return base(**{'model.num_experts': 8, 'model.moe.dropless': True,
                 'model.moe.dropless_impl': 'padded'})


def drop_ragged64():
  return base(**{'model.num_experts': 64, 'model.moe.dropless': True,
                 'model.moe.dropless_impl': 'ragged'})


def drop_padded64():
  return base(**{'model.num_experts': 64, 'model.moe.dropless': True,
                 'model.moe.dropless_impl': 'padded'})


CONFIGS = {'dense': dense, 'moe8': moe8, 'moe64': moe64, 'drop_ragged': drop_ragged,
           'drop_padded': drop_padded, 'drop_ragged64': drop_ragged64,
           'drop_padded64': drop_padded64}
