"""Text from a trained run: restore its newest checkpoint on one device and continue a batch
of prompts (temperature, top-k and top-p sampling, seeded; temperature 0 is greedy).

With the key-value cache (the default) each row's context is encoded once (prefill) and
each new token then costs one position: a decode step runs the B pending tokens against
the cache [B, layers, S, G, K]. Without it every step runs the model on each row's whole
context (the reference the cache path is tested against). Both keep a row's context within
the window W = data.seq_len the model was trained on: when it would pass W tokens, the row
keeps its newest W // 2 tokens, re-encoded at positions from 0.

MoE layers run dropless at sampling time (token choice), so each token's output is the
same whatever else is in the batch and a decode step equals the full forward. Expert choice
routes each step among the B new tokens, which the full forward does not; its sampling is
therefore not causal and the cache path differs from the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moetrain import config as config_lib
from moetrain import restore as restore_lib


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is drawn from the logits: temperature 0 is greedy; top_k 0 and
  top_p 1.0 keep every token."""
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 1.0

  def check(self):
    """Raises ConfigError (one sentence naming the flag) for a bad setting."""
    if not self.temperature >= 0:
      raise config_lib.ConfigError(f'--temperature={self.temperature} is negative; use 0 '
                                   '(greedy) or a positive value such as 0.8.')
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise config_lib.ConfigError(f'--top_k={self.top_k} must be a non-negative integer; '
                                   'use 0 to keep every token.')
    if not 0 < self.top_p <= 1:
      raise config_lib.ConfigError(f'--top_p={self.top_p} must lie in (0, 1]; use 1.0 to '
                                   'keep every token.')


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Logits with the tokens outside the top k (k > 0) and then outside the nucleus (the
  fewest most probable tokens whose probabilities sum to at least top_p) set to -inf."""
  neg_inf = jnp.finfo(logits_BV.dtype).min
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)  # >= 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def next_tokens(logits_BV: jax.Array, keys_B: jax.Array, sampler: Sampler) -> jax.Array:
  """int32 [B]: the argmax (temperature 0) or a draw from softmax(logits / temperature)
  after top-k / top-p filtering, row b with its own key keys_B[b]."""
  if sampler.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / sampler.temperature, sampler.top_k, sampler.top_p)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def step_keys(seed, step, batch: int) -> jax.Array:
  """The keys of generation step `step`, one per row: row b's draws depend only on
  (seed, b, step), not on the other prompts of the batch."""
  base = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef, state, cache, tokens_BW, positions_BW):
  """Writes the keys and values of tokens_BW at positions_BW (positions >= W: none)."""
  return nnx.merge(graphdef, state).decode(tokens_BW, positions_BW, cache)[1]


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=2)
def _decode_step(graphdef, state, cache, tokens_B, positions_B, seed, step, sampler):
  """One position per row: the next token of each row and the updated cache."""
  logits_B1V, cache = nnx.merge(graphdef, state).decode(tokens_B[:, None],
                                                        positions_B[:, None], cache)
  keys_B = step_keys(seed, step, tokens_B.shape[0])
  return next_tokens(logits_B1V[:, 0], keys_B, sampler), cache


@functools.partial(jax.jit, static_argnums=(0, 6))
def _full_step(graphdef, state, tokens_BW, lengths_B, seed, step, sampler):
  """The next token of each row from the full forward of its context (left-aligned in a
  window of W tokens, read at position length - 1)."""
  logits_BWV, _ = nnx.merge(graphdef, state)(tokens_BW, train=False)
  last_BV = jnp.take_along_axis(logits_BWV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return next_tokens(last_BV, step_keys(seed, step, tokens_BW.shape[0]), sampler)


class _Contexts:
  """Each row's token ids and the start of its context (shifted by W // 2 on overflow)."""

  def __init__(self, prompts, window: int):
    self.ids = [[int(i) for i in p] for p in prompts]
    self.start = [0] * len(prompts)
    self.window = window

  def shift(self) -> list[int]:
    """Moves the start of every row whose context passed the window; returns those rows."""
    shifted = []
    for b, ids in enumerate(self.ids):
      if len(ids) - self.start[b] > self.window:
        self.start[b] = len(ids) - max(1, self.window // 2)
        shifted.append(b)
    return shifted

  def context(self, b: int) -> list[int]:
    return self.ids[b][self.start[b]:]

  def block(self, rows, drop_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Contexts of `rows` left-aligned in int32 [B, W] (without their last token when
    `drop_last`), and positions [B, W]: 0.. on their tokens, W (writes nothing) elsewhere."""
    batch, window = len(self.ids), self.window
    tokens_BW = np.zeros((batch, window), np.int32)
    positions_BW = np.full((batch, window), window, np.int32)
    for b in rows:
      context = self.context(b)[:-1] if drop_last else self.context(b)
      tokens_BW[b, :len(context)] = context
      positions_BW[b, :len(context)] = np.arange(len(context))
    return tokens_BW, positions_BW


def generate(model, prompts, *, max_new_tokens: int, window: int,
             sampler: Sampler = Sampler(temperature=0.0), seed: int = 0,
             stop_id: int | None = None, kv_cache: bool = True) -> list[list[int]]:
  """The ids that follow each prompt in `prompts` (lists of ids): at most max_new_tokens
  each, a row ending after it emits stop_id."""
  sampler.check()
  if not prompts or any(len(p) == 0 for p in prompts):
    raise config_lib.ConfigError('a prompt is empty; pass --prompt with some text.')
  graphdef, state = nnx.split(model)
  rows = _Contexts(prompts, window)
  batch = len(prompts)
  out, done = [[] for _ in prompts], [False] * batch
  cache = model.init_cache(batch, window) if kv_cache else None
  fresh = list(range(batch))  # rows whose cache must be (re)filled
  for step in range(max_new_tokens):
    fresh = sorted(set(fresh) | set(rows.shift()))
    if kv_cache:
      if fresh:
        cache = _prefill(graphdef, state, cache, *map(jnp.asarray, rows.block(fresh, True)))
      last_B = np.asarray([rows.context(b)[-1] for b in range(batch)], np.int32)
      position_B = np.asarray([len(rows.context(b)) - 1 for b in range(batch)], np.int32)
      tokens_B, cache = _decode_step(graphdef, state, cache, jnp.asarray(last_B),
                                     jnp.asarray(position_B), seed, step, sampler)
      fresh = []
    else:
      tokens_BW, _ = rows.block(range(batch), False)
      lengths_B = np.asarray([len(rows.context(b)) for b in range(batch)], np.int32)
      tokens_B = _full_step(graphdef, state, jnp.asarray(tokens_BW), jnp.asarray(lengths_B),
                            seed, step, sampler)
    for b, token in enumerate(np.asarray(tokens_B).tolist()):
      if not done[b]:
        rows.ids[b].append(token)
        out[b].append(token)
        done[b] = token == stop_id
    if all(done):
      break
  return out


def load(workdir, overrides: dict | None = None) -> restore_lib.Run:
  """The run of `workdir` on one device, its MoE layers dropless when they route by token
  choice (see the module docstring)."""
  cfg = restore_lib.run_config(workdir, overrides)
  forced = {'mesh.data': 1, 'mesh.expert': 1}
  if cfg.model.num_experts and cfg.model.moe.router == 'token_choice':
    forced['model.moe.dropless'] = True
  return restore_lib.load(workdir, {**(overrides or {}), **forced},
                          devices=jax.local_devices()[:1])


def sample(workdir, prompts: list[str], *, max_new_tokens: int = 200,
           sampler: Sampler = Sampler(), seed: int = 0, kv_cache: bool = True,
           overrides: dict | None = None) -> list[str]:
  """The continuations of `prompts` by the model of `workdir` (decoded texts)."""
  sampler.check()
  run = load(workdir, overrides)
  tokenizer = run.tokenizer
  new = generate(run.model(), [tokenizer.encode(p) for p in prompts],
                 max_new_tokens=max_new_tokens, window=run.cfg.data.seq_len,
                 sampler=sampler, seed=seed, stop_id=tokenizer.eod_id, kv_cache=kv_cache)
  return [tokenizer.decode([i for i in ids if i != tokenizer.eod_id]) for ids in new]
