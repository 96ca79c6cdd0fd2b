"""Small building blocks: parameters with logical axes, RMSNorm, rotary embeddings, SwiGLU.

Every parameter carries `axes`, a tuple of logical axis names (one per dimension, or None);
`moetrain.parallel.mesh` maps them to mesh axes in one place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.parallel.mesh import current_mesh, gather, logical_to_spec


def scoped(name: str):
  """Decorator: the function runs under `jax.named_scope(name)`, so the HLO ops it makes
  (and their gradients) carry `name` in their op_name metadata, which profiles group by
  (bench/breakdown.py)."""
  def wrap(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
      with jax.named_scope(name):
        return fn(*args, **kwargs)
    return call
  return wrap


def layer_axes(variable: nnx.Variable) -> tuple:
  """The logical axes of the variable's value: inside a scan over stacked layers the
  value is one layer's slice, so a leading 'layers' axis is dropped."""
  value = variable[...]
  axes = variable.get_metadata().get('axes') or (None,) * value.ndim
  return axes[1:] if len(axes) == value.ndim + 1 and axes[0] == 'layers' else axes


def use(variable: nnx.Variable, dtype=None) -> jax.Array:
  """A weight's value for compute: cast to `dtype` (if given), then gathered whole on the
  mesh (under FSDP the all-gather happens here, per layer and just in time, on the cast
  copy; the gradient is reduce-scattered back to the weight's split)."""
  value, axes = variable[...], layer_axes(variable)
  value = value if dtype is None else value.astype(dtype)
  mesh = current_mesh()
  if mesh is None:
    return value
  return gather(value, logical_to_spec(axes, value.shape, mesh.shape))


def param(rngs: nnx.Rngs, shape, axes, *, std: float | None = None, fan_in: int | None = None,
          dtype=jnp.float32, init: str = 'normal') -> nnx.Param:
  """A parameter with logical `axes`.

  init='normal': truncated normal with stddev `std`, or 1/sqrt(fan_in) when std is None;
  init='ones' / 'zeros': constant.
  """
  assert len(axes) == len(shape), (axes, shape)
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    scale = std if std is not None else fan_in ** -0.5
    value = scale * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype.
  `axis_name` is the logical axis of the scale (`head_dim` for per-head q/k norms)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32,
               axis_name: str = 'embed'):
    self.scale = param(rngs, (dim,), (axis_name,), init='ones', dtype=param_dtype)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * use(self.scale, jnp.float32)).astype(x.dtype)


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) on the last axis of [B, L, H, K]."""
  half = x_BLHK.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLF = positions_BL.astype(jnp.float32)[..., None] * freq
  sin = jnp.sin(angle_BLF)[:, :, None, :]
  cos = jnp.cos(angle_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def swiglu(x, w_gate, w_up, w_down, spec_in: str, spec_out: str):
  """SwiGLU feed-forward: (silu(x @ w_gate) * (x @ w_up)) @ w_down, as two einsum specs.

  Used for the dense FFN ('...d,df->...f') and for the batched experts
  ('ecd,edf->ecf'); weights must already be in the compute dtype.
  """
  h = jax.nn.silu(jnp.einsum(spec_in, x, w_gate)) * jnp.einsum(spec_in, x, w_up)
  return jnp.einsum(spec_out, h, w_down)


class MLP(nnx.Module):
  """Dense SwiGLU feed-forward [..., D] -> [..., D] with hidden size F."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.w_gate = param(rngs, (d_model, d_ff), ('embed', 'mlp'), fan_in=d_model,
                        dtype=param_dtype)
    self.w_up = param(rngs, (d_model, d_ff), ('embed', 'mlp'), fan_in=d_model,
                      dtype=param_dtype)
    self.w_down = param(rngs, (d_ff, d_model), ('mlp', 'embed'), fan_in=d_ff,
                        dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x):
    cast = lambda w: use(w, self.dtype)
    # Tokens flattened to [T, D]: XLA:CPU runs the weight gradient of a [B, L, D] einsum
    # (two contracted axes) 2-3x slower than one GEMM (bench/NOTES.md).
    x_TD = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y_TD = swiglu(x_TD, cast(self.w_gate), cast(self.w_up), cast(self.w_down),
                  'td,df->tf', 'tf,fd->td')
    return y_TD.reshape(*x.shape[:-1], y_TD.shape[-1])
