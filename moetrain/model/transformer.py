"""Decoder-only language model: embedding -> N x (attention, dense or MoE FFN) -> logits.

Blocks run one of two ways (`model.scan_layers`):
- unscanned: a Python loop over N separately stored blocks (the program grows with N);
- scanned: the layers fall into runs that repeat one unit (the first_k_dense dense layers;
  then units of moe_every layers, moe_every - 1 dense and one MoE; then any dense tail),
  each run's weights are stacked along a leading 'layers' axis, and `jax.lax.scan` runs
  the unit once per repetition, so one unit is traced and compiled per run.
Both initialize identically (the scanned model stacks the very blocks the unscanned one
builds) and compute the same function.

`model.remat` wraps each block in `jax.checkpoint` with a policy (`REMAT_POLICIES`): a
pure function of the block's nnx state, so it works on every flax version.

`Transformer.__call__` runs whole sequences (training, eval); `Transformer.decode` runs new
tokens against a key-value cache (`KVCache`) for sampling: prefill a prompt once, then one
position per generated token (a scanned model decodes layer by layer from its stacks).
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from moetrain import config as config_lib
from moetrain.model.attention import Attention
from moetrain.model.layers import MLP, RMSNorm, param, use
from moetrain.model.moe import MoE
from moetrain.model.moe_ffn import MoESpec, layer_specs
from moetrain.parallel.mesh import constrain_batch

# model.remat -> what the backward pass may keep from the forward pass of a block.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,  # only the block's inputs
    'save_dots': jax.checkpoint_policies.dots_saveable,  # every matmul output
    # Matmuls without batch dimensions (the weight GEMMs), not the attention scores:
    # MaxText's 'minimal'.
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, model_cfg, moe_spec: MoESpec | None, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    """`moe_spec`: the spec of the block's MoE layer, None for a dense feed-forward."""
    m = model_cfg
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(m.d_model, m.num_heads, m.num_kv_heads, rope_theta=m.rope_theta,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                          qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, norm_eps=m.norm_eps,
                          head_dim=m.head_dim, impl=m.attention_impl)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    if moe_spec is not None:
      self.ffn = MoE(m, moe_spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    else:
      self.ffn = MLP(m.d_model, m.d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.is_moe = moe_spec is not None

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, *, train: bool, rng):
    x_BLD = constrain_batch(x_BLD)
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)
    return self.ffn_residual(x_BLD, train=train, rng=rng)

  def ffn_residual(self, x_BLD, *, train: bool, rng):
    """x + ffn(norm(x)) and the MoE layer's statistics (None for a dense FFN)."""
    h_BLD = self.ffn_norm(x_BLD)
    if self.is_moe:
      y_BLD, stats = self.ffn(h_BLD, train=train, rng=rng)
    else:
      y_BLD, stats = self.ffn(h_BLD), None
    return x_BLD + y_BLD.astype(x_BLD.dtype), stats

  def decode(self, x_BLD, positions_BL, k_BSGK, v_BSGK):
    """The block on L new tokens per row against this layer's key-value cache (eval mode);
    returns (x [B, L, D], k_BSGK, v_BSGK) with the new keys and values written."""
    y_BLD, k_BSGK, v_BSGK = self.attn.decode(self.attn_norm(x_BLD), positions_BL, k_BSGK,
                                             v_BSGK)
    x_BLD, _ = self.ffn_residual(x_BLD + y_BLD, train=False, rng=None)
    return x_BLD, k_BSGK, v_BSGK


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, [B, layers, S, G, K] each: row b's token at position p
  sits in slot p (S slots: positions 0..S-1)."""
  k: jax.Array
  v: jax.Array


@dataclasses.dataclass(frozen=True)
class Run:
  """Layers start .. start + repeats * len(unit) - 1: `repeats` copies of `unit` (one
  is_moe flag per layer of the unit)."""
  start: int
  unit: tuple[bool, ...]
  repeats: int

  def layers(self) -> list[int]:
    return list(range(self.start, self.start + self.repeats * len(self.unit)))


def layer_runs(model_cfg) -> list[Run]:
  """The homogeneous runs of the layer stack, in order (adjacent equal units merged)."""
  m = model_cfg
  moe = set(config_lib.moe_layers(m))
  pieces = [Run(0, (False,), m.first_k_dense)]
  if moe:
    body = (m.num_layers - m.first_k_dense) // m.moe_every
    pieces.append(Run(m.first_k_dense, (False,) * (m.moe_every - 1) + (True,), body))
    tail_start = m.first_k_dense + body * m.moe_every
    pieces.append(Run(tail_start, (False,), m.num_layers - tail_start))
  else:
    pieces.append(Run(m.first_k_dense, (False,), m.num_layers - m.first_k_dense))
  runs = []
  for run in (p for p in pieces if p.repeats):
    if runs and runs[-1].unit == run.unit:
      runs[-1] = Run(runs[-1].start, run.unit, runs[-1].repeats + run.repeats)
    else:
      runs.append(run)
  assert [is_moe for r in runs for is_moe in r.unit * r.repeats] == [
      i in moe for i in range(m.num_layers)], runs
  return runs


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module whose every variable stacks the modules' (same structure) along a new
  leading axis; logical `axes` metadata gains a leading 'layers'."""
  graphdef = nnx.graphdef(modules[0])
  states = [nnx.state(m) for m in modules]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def add_axis(v):
    axes = v.get_metadata().get('axes')
    return v.replace(axes=('layers',) + tuple(axes)) if axes else v

  stacked = jax.tree.map(add_axis, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


def unstack_module(module: nnx.Module, index: int) -> nnx.Module:
  """Repetition `index` of a module made by `stack_modules`: every variable's slice, without
  the leading 'layers' axis."""
  graphdef, state = nnx.split(module)

  def take(v):
    axes = v.get_metadata().get('axes')
    v = v.replace(v[...][index])
    return v.replace(axes=tuple(axes)[1:]) if axes else v

  return nnx.merge(graphdef, jax.tree.map(take, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))


class ScannedRun(nnx.Module):
  """A `Run` of blocks with stacked weights: `units[j]` holds layer j of the unit for all
  repetitions (leading axis `repeats`)."""

  def __init__(self, run: Run, blocks: list[Block]):
    u = len(run.unit)
    self.units = nnx.List([stack_modules(blocks[j::u]) for j in range(u)])
    self.run = run


def block_fn(graphdef, *, train: bool, remat: str, scanned: bool):
  """(block state, x_BLD, positions_BL, segment_ids_BL, rng) -> (x_BLD, stats or None):
  the block as a pure function of its state, rematerialized by `remat`."""
  def apply(state, x_BLD, positions_BL, segment_ids_BL, rng):
    block = nnx.merge(graphdef, state)
    return block(x_BLD, positions_BL, segment_ids_BL, train=train, rng=rng)

  if remat == 'none':
    return apply
  # Inside a scan the loop already keeps the recomputation apart: no CSE barrier needed.
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


class Transformer(nnx.Module):
  """tokens [B, L] int32 -> logits [B, L, V] float32, plus one statistics dict per MoE layer."""

  def __init__(self, model_cfg, *, rngs: nnx.Rngs):
    m = model_cfg
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    self.embed = param(rngs, (m.vocab_size, m.d_model), ('vocab', 'embed'), std=m.init_std,
                       dtype=param_dtype)
    specs = layer_specs(m)
    blocks = [Block(m, specs.get(i), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
              for i in range(m.num_layers)]
    if m.scan_layers:
      self.blocks = None
      self.runs = nnx.List([ScannedRun(run, blocks[run.start:run.start + len(run.layers())])
                            for run in layer_runs(m)])
    else:
      self.blocks = nnx.List(blocks)
      self.runs = None
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.unembed = None if m.tie_embeddings else param(
        rngs, (m.d_model, m.vocab_size), ('embed', 'vocab'), fan_in=m.d_model,
        dtype=param_dtype)
    self.dtype = dtype
    self.remat = m.remat

  def hidden(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, train: bool = False,
             rng=None):
    """The final-normed hidden states [B, L, D] and one statistics dict per MoE layer."""
    batch, length = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if rng is None:
      rng = jax.random.key(0)
    x_BLD = self.embed_tokens(tokens_BL)
    args = (positions_BL, segment_ids_BL)
    stats = []
    if self.runs is None:
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        fn = block_fn(graphdef, train=train, remat=self.remat, scanned=False)
        x_BLD, block_stats = fn(state, x_BLD, *args, jax.random.fold_in(rng, i))
        if block_stats is not None:
          stats.append(block_stats)
    else:
      for scanned in self.runs:
        x_BLD, run_stats = self._scan_run(scanned, x_BLD, args, train, rng)
        stats += run_stats
    return self.final_norm(x_BLD), stats

  def _scan_run(self, scanned: ScannedRun, x_BLD, args, train, rng):
    """One scanned run: lax.scan over its repetitions. Returns x and the per-layer stats
    of its MoE layers in layer order."""
    run = scanned.run
    u = len(run.unit)
    splits = [nnx.split(unit) for unit in scanned.units]
    fns = [block_fn(g, train=train, remat=self.remat, scanned=True) for g, _ in splits]

    def body(x_BLD, xs):
      states, repeat = xs
      moe_stats = []
      for j, (fn, state) in enumerate(zip(fns, states)):
        layer = run.start + repeat * u + j
        x_BLD, block_stats = fn(state, x_BLD, *args, jax.random.fold_in(rng, layer))
        if block_stats is not None:
          moe_stats.append(block_stats)
      return x_BLD, moe_stats

    states = tuple(state for _, state in splits)
    x_BLD, moe_stats = jax.lax.scan(body, x_BLD, (states, jnp.arange(run.repeats)))
    per_layer = [jax.tree.map(lambda a: a[r], s) for r in range(run.repeats)
                 for s in moe_stats]  # repetition-major: layer order
    return x_BLD, per_layer

  def moe_modules(self) -> list[tuple[MoE, list[int]]]:
    """Each MoE module with the layers it serves, in layer order: one layer when
    unscanned; a scanned module's variables are stacked over its layers."""
    if self.runs is None:
      return [(b.ffn, [i]) for i, b in enumerate(self.blocks) if b.is_moe]
    out = []
    for scanned in self.runs:
      u = len(scanned.run.unit)
      for j, unit in enumerate(scanned.units):
        if unit.is_moe:
          out.append((unit.ffn, scanned.run.layers()[j::u]))
    return out

  def embed_tokens(self, tokens_BL):
    """tokens [B, L] int32 -> embeddings [B, L, D] in the compute dtype."""
    return use(self.embed, self.dtype)[tokens_BL]

  def logits(self, x_BLD):
    """Final norm and unembedding: [B, L, D] -> float32 logits [B, L, V]."""
    return self.logits_fn()(self.final_norm(x_BLD))

  def layer_blocks(self) -> list[Block]:
    """The blocks in layer order; a scanned model's are sliced out of its stacks."""
    if self.runs is None:
      return list(self.blocks)
    blocks = {}
    for scanned in self.runs:
      u = len(scanned.run.unit)
      for j, unit in enumerate(scanned.units):
        for r, layer in enumerate(scanned.run.layers()[j::u]):
          blocks[layer] = unstack_module(unit, r)
    return [blocks[layer] for layer in sorted(blocks)]

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for `batch` rows, in the compute dtype."""
    blocks = self.layer_blocks()
    attn = blocks[0].attn
    shape = (batch, len(blocks), length, attn.num_kv_heads, attn.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def decode(self, tokens_BL, positions_BL, cache: KVCache):
    """L new tokens per row at `positions_BL` against `cache` (eval mode, no statistics):
    float32 logits [B, L, V] and the cache with their keys and values written. A position
    >= the cache length writes nothing (its logits are then meaningless)."""
    x_BLD = self.embed_tokens(tokens_BL)
    ks, vs = [], []
    for i, block in enumerate(self.layer_blocks()):
      x_BLD, k_BSGK, v_BSGK = block.decode(x_BLD, positions_BL, cache.k[:, i], cache.v[:, i])
      ks.append(k_BSGK)
      vs.append(v_BSGK)
    return self.logits(x_BLD), KVCache(jnp.stack(ks, axis=1), jnp.stack(vs, axis=1))

  def logits_fn(self):
    """x_BLD -> logits [B, L, V] float32: `output_logits` over this model's output weights
    (a pure function, for the chunked loss)."""
    tied = self.unembed is None
    w = use(self.embed if tied else self.unembed, self.dtype)
    return functools.partial(output_logits, w=w, tied=tied, dtype=self.dtype)

  def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None,
               train: bool = False, rng=None):
    x_BLD, stats = self.hidden(tokens_BL, positions_BL=positions_BL,
                               segment_ids_BL=segment_ids_BL, train=train, rng=rng)
    return self.logits_fn()(x_BLD), stats


def output_logits(x_BLD, *, w, tied: bool, dtype):
  """Output projection of hidden states [B, L, D] -> logits [B, L, V] float32; `w` is the
  embedding table [V, D] when `tied`, else the unembedding [D, V]."""
  batch, length, d = x_BLD.shape
  x_TD = x_BLD.astype(dtype).reshape(batch * length, d)  # one GEMM (bench/NOTES.md)
  w = w.astype(dtype)
  logits = jnp.einsum('td,vd->tv', x_TD, w) if tied else x_TD @ w
  return logits.reshape(batch, length, -1).astype(jnp.float32)
