"""Text from a trained run: restore the newest checkpoint of a workdir on one device and
continue a prompt token by token (temperature sampling; 0 is greedy).

The forward pass is compiled once for a fixed window of `data.seq_len` tokens: the prompt
and the tokens generated so far sit left-aligned in the window and the next token is read
at the last filled position (the model is causal, so the empty tail cannot leak in). Once
the window is full it slides, keeping the newest seq_len tokens.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import paths
from moetrain import train as train_lib
from moetrain.parallel import mesh as mesh_lib


def load(workdir):
  """(model, config, tokenizer, step) from the newest readable checkpoint in `workdir`."""
  workdir = paths.path(workdir)
  path = workdir / 'config.json'
  if not paths.is_file(path):
    raise config_lib.ConfigError(f'{workdir} has no config.json; pass the --workdir of a '
                                 'training run.')
  cfg = config_lib.from_dict(json.loads(paths.read_text(path)))
  cfg.mesh.data, cfg.mesh.expert = 1, 1
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep)
  if not checkpointer.steps():
    raise config_lib.ConfigError(f'{workdir} has no checkpoints yet; train it first.')
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  graphdef, abstract, shardings = train_lib.abstract_state(
      cfg, mesh, train_lib.make_optimizer(cfg.train))
  step, state, _ = checkpointer.restore_latest(train_lib.restore_target(abstract, shardings))
  checkpointer.close()
  model = nnx.merge(graphdef, state.params, state.model_state)
  return model, cfg, data_lib.make_tokenizer(cfg.data), step


@functools.partial(jax.jit, static_argnums=0)
def _next_logits(graphdef, state, tokens_L, length):
  logits_BLV, _ = nnx.merge(graphdef, state)(tokens_L[None], train=False)
  return logits_BLV[0, length - 1]


def make_next_logits(model):
  """(tokens_L int32 [window], length) -> float32 logits [V] at position length-1; compiled
  once per model structure and window."""
  graphdef, state = nnx.split(model)
  return lambda tokens_L, length: _next_logits(graphdef, state, tokens_L, length)


def generate(model, prompt_ids, *, max_new_tokens: int, window: int, temperature: float,
             seed: int = 0, stop_id: int | None = None) -> list[int]:
  """The ids that follow `prompt_ids` (at most max_new_tokens; stops after stop_id)."""
  if len(prompt_ids) == 0:
    raise config_lib.ConfigError('the prompt is empty; pass --prompt with some text.')
  if temperature < 0:
    raise config_lib.ConfigError(f'--temperature={temperature} is negative; use 0 (greedy) '
                                 'or a positive value such as 0.8.')
  next_logits = make_next_logits(model)
  ids = [int(i) for i in prompt_ids]
  rng = jax.random.key(seed)
  out = []
  for _ in range(max_new_tokens):
    context = ids[-window:]
    tokens_L = np.zeros((window,), np.int32)
    tokens_L[:len(context)] = context
    logits_V = next_logits(jnp.asarray(tokens_L), len(context))
    if temperature == 0:
      token = int(jnp.argmax(logits_V))
    else:
      rng, key = jax.random.split(rng)
      token = int(jax.random.categorical(key, logits_V / temperature))
    ids.append(token)
    out.append(token)
    if token == stop_id:
      break
  return out


def sample(workdir, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           seed: int = 0) -> str:
  """The continuation of `prompt` by the model of `workdir` (decoded text)."""
  model, cfg, tokenizer, _ = load(workdir)
  new = generate(model, tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
                 window=cfg.data.seq_len, temperature=temperature, seed=seed,
                 stop_id=tokenizer.eod_id)
  return tokenizer.decode([i for i in new if i != tokenizer.eod_id])
