"""Sampling from a trained run: the fixed-window forward equals the model on the exact
prefix, greedy decoding is the argmax chain, and the command restores the newest step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import sample as sample_lib
from moetrain import train
from moetrain.config import ConfigError

from conftest import tiny_config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  cfg = tiny_config(**{'train.steps': 3, 'mesh.data': -1, 'mesh.expert': 2,
                       'checkpoint.every_steps': 2})
  train.train(cfg, workdir, log=lambda *_: None)
  return workdir


def test_load_restores_the_newest_step_on_one_device(run):
  model, cfg, tokenizer, step = sample_lib.load(run)
  assert step == 3 and cfg.mesh.expert == 1 and tokenizer.eod_id == 256


def test_greedy_is_the_argmax_chain_of_the_exact_prefix(run):
  """Reference: the model run on exactly the prompt plus what it generated, no padding.
  The prompt nearly fills the 32-token window, so the window slides after 2 tokens."""
  model, cfg, tokenizer, _ = sample_lib.load(run)
  prompt = list(tokenizer.encode('import os, sys\nfrom typing imp'))
  assert len(prompt) == 30 and cfg.data.seq_len == 32
  got = sample_lib.generate(model, prompt, max_new_tokens=6, window=32, temperature=0.0)
  ids = list(prompt)
  for _ in range(6):
    context = np.asarray(ids[-32:], np.int32)[None]
    logits, _ = jax.jit(lambda c: model(c, train=False))(jnp.asarray(context))
    ids.append(int(np.argmax(np.asarray(logits[0, -1]))))
  assert got == ids[len(prompt):]


def test_temperature_sampling_is_seeded(run):
  model, cfg, tokenizer, _ = sample_lib.load(run)
  prompt = tokenizer.encode('def ')
  draw = lambda seed: sample_lib.generate(model, prompt, max_new_tokens=12, window=32,
                                          temperature=1.0, seed=seed)
  assert draw(1) == draw(1)
  assert draw(1) != draw(2)


def test_sample_text_and_errors(run, tmp_path):
  text = sample_lib.sample(run, 'class ', max_new_tokens=5, temperature=0.0)
  assert isinstance(text, str) and 0 < len(text.encode()) <= 5 * 4
  with pytest.raises(ConfigError, match='has no config.json'):
    sample_lib.sample(tmp_path, 'x')
  model, *_ = sample_lib.load(run)
  with pytest.raises(ConfigError, match='the prompt is empty'):
    sample_lib.generate(model, [], max_new_tokens=1, window=8, temperature=0.0)
  with pytest.raises(ConfigError, match='--temperature=-1.0 is negative'):
    sample_lib.generate(model, [1], max_new_tokens=1, window=8, temperature=-1.0)
