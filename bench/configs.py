"""Bench configs: one function per config, each returning a validated ConfigDict.

All share the non-FFN part (2 layers, heads of 64 with 2 query heads per key-value head,
vocab 2048, sequences of 256 tokens, float32) so that step-time ratios isolate the
feed-forward. Default width d_model 512 and batch 32 (8192 tokens per step); `bench/run.py
--d-model=256 --batch-size=8` is the quick small variant (see NOTES.md for both).
The MoE configs use k=2 experts of hidden size 2 d_model, so a token's active expert
parameters equal the dense FFN's (d_ff = k * d_expert = 4 d_model).
Capacity factor 1.0: R4 is defined at 1.0, and at 1.0 the padded expert compute equals the
dense FFN's (at 1.25 the experts do 25% more matmul work by construction).

The `*_1b` configs are the GPU sizes of issue 17 (fixed, not changed by --d-model or
--batch-size): d_model 2048, 12 layers, heads of 128 (16 query, 8 key-value), vocab 32768
(tied), sequences of 2048 tokens, batch 16 (32768 tokens per step), bfloat16 compute over
float32 master weights, attention through `attention_impl='auto'` (cuDNN flash on GPU).
moe8_1b: E=8, k=2, d_expert 1280 (0.97B parameters, 0.41B active); moe64_1b: the same
experts cut in four, E=64, k=8, d_expert 320 (equal active parameters, 1.73B in all);
dense_1b: d_ff 2560 (the same active parameters). Capacity factor 1.25 (a common training
setting; MFU counts the k useful experts per token only); the `_dropless*` variants route
without a capacity (bench/NOTES.md "GPU plan").
"""

from __future__ import annotations

import functools

from moetrain import config as config_lib

VOCAB = 2048


D_MODEL = 512  # --d-model changes it; heads of 64, d_ff = 4 d, d_expert = 2 d.
BATCH_SIZE = 32  # --batch-size changes it (sequences of 256 tokens).
DTYPE = 'float32'  # --dtype changes it (bfloat16 on GPU/TPU by default).
SET: dict = {}  # --set KEY=VALUE: applied to every config last (set_size).


def add_size_flags(parser):
  """--d-model, --batch-size and --dtype of every config (bench/run.py, bench/profile.py)."""
  parser.add_argument('--d-model', type=int, default=D_MODEL,
                      help='width of every bench config (heads of 64, d_ff 4x, d_expert 2x)')
  parser.add_argument('--batch-size', type=int, default=BATCH_SIZE,
                      help='sequences of 256 tokens per step')
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                      help="compute dtype of every config (auto: the machine's matmul dtype, "
                      'float32 on CPU, else bfloat16)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config key set in every config, after its own values (e.g. '
                      '--set data.batch_size=8 for the ~1B configs on an 80 GB GPU)')


def set_size(d_model: int, batch_size: int, dtype: str = 'auto', sets=()):
  """Sets the width, batch and compute dtype every config function builds with, and the
  `--set KEY=VALUE` overrides applied to every config last."""
  global D_MODEL, BATCH_SIZE, DTYPE, SET
  from moetrain import sweep
  default = config_lib.default_config()
  SET = {key: values[-1] for key, values in (sweep.parse_axis(spec, default, '--set')
                                            for spec in sets)}
  D_MODEL, BATCH_SIZE = d_model, batch_size
  if dtype == 'auto':  # imports jax: callers that set XLA_FLAGS pass a dtype
    import jax.numpy as jnp
    from bench import harness
    dtype = jnp.dtype(harness.default_matmul_dtype()).name
  DTYPE = dtype


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
  for key, value in {**overrides, **SET}.items():
    config_lib.set_key(c, key, value)
  return config_lib.validate(c)


def dense():
  """Dense SwiGLU FFN with d_ff = k * d_expert: the same active parameters as moe8/moe64."""
  return base()


def moe8():
  return base(**{'model.num_experts': 8})


def moe64():
  return base(**{'model.num_experts': 64})


def dropless(num_experts: int, impl: str):
  """A MoE config without drops: impl 'ragged' runs `jax.lax.ragged_dot` grouped matmuls
  (TPU's default), 'padded' buffers of capacity T per expert (CPU's and GPU's)."""
  return base(**{'model.num_experts': num_experts, 'model.moe.dropless': True,
                 'model.moe.dropless_impl': impl})


# The shared part of the ~1B GPU configs (module docstring); tests shrink it.
SIZE_1B = {
    'model.vocab_size': 32768, 'model.d_model': 2048, 'model.num_layers': 12,
    'model.num_heads': 16, 'model.num_kv_heads': 8, 'model.d_ff': 2560,
    'model.moe.capacity_factor': 1.25, 'model.dtype': 'bfloat16',
    'model.param_dtype': 'float32', 'model.attention_impl': 'auto', 'data.seq_len': 2048,
    'data.batch_size': 16}
# experts -> (top_k, d_expert): a token uses k * d_expert = d_ff expert hidden units.
SHAPES_1B = {8: (2, 1280), 64: (8, 320)}


def size_1b(**overrides):
  return base(**{**SIZE_1B, **overrides})


def moe_1b(num_experts: int, **overrides):
  """E=8 top-2 (d_expert 1280) or E=64 top-8 (d_expert 320): equal active parameters."""
  top_k, d_expert = SHAPES_1B[num_experts]
  return size_1b(**{'model.num_experts': num_experts, 'model.moe.top_k': top_k,
                    'model.moe.d_expert': d_expert, **overrides})


def dropless_1b(num_experts: int, impl: str, grouped_matmul: str = 'xla'):
  """moe_1b without a capacity: impl 'auto' (what training picks on this backend),
  'padded' (buffers of T rows per expert) or 'ragged' (grouped matmuls by `grouped_matmul`:
  'xla' is jax.lax.ragged_dot, 'tokamax' tokamax's kernels)."""
  overrides = {'model.moe.dropless': True, 'model.moe.dropless_impl': impl}
  if grouped_matmul != 'xla':
    overrides['model.moe.grouped_matmul'] = grouped_matmul
  return moe_1b(num_experts, **overrides)


CONFIGS_1B = {
    'dense_1b': size_1b,
    'moe8_1b': functools.partial(moe_1b, 8),
    'moe64_1b': functools.partial(moe_1b, 64),
    **{f'moe{e}_1b_dropless{"" if impl == "auto" else "_" + impl}': functools.partial(
        dropless_1b, e, impl) for e in (8, 64) for impl in ('auto', 'padded', 'ragged')},
    **{f'moe{e}_1b_tokamax': functools.partial(dropless_1b, e, 'ragged', 'tokamax')
       for e in (8, 64)},
}

CONFIGS = {'dense': dense, 'moe8': moe8, 'moe64': moe64,
           **{f'drop_{impl}{suffix}': functools.partial(dropless, experts, impl)
              for experts, suffix in ((8, ''), (64, '64')) for impl in ('ragged', 'padded')}}
CONFIGS.update(CONFIGS_1B)
