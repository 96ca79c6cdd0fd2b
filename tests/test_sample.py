"""Sampling from a trained run: greedy decoding with the KV cache equals decoding without
it token for token (batched prompts, window shifts), the no-cache path is the argmax chain
of the exact contexts, top-k / top-p / temperature draws follow a NumPy reference, and the
draws are seeded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import sample as sample_lib
from moetrain.config import ConfigError

GREEDY = sample_lib.Sampler(temperature=0.0)
W = 16  # the sampling window of most tests (the run's seq_len is 32).


@pytest.fixture(scope='module')
def run(trained_run):
  return sample_lib.load(trained_run)


@pytest.fixture(scope='module')
def prompts(run):
  texts = ['import os, sys\nfrom typing imp', 'def ', 'class Foo:\n    def __init__(self']
  return [list(run.tokenizer.encode(t)) for t in texts]


def test_load_restores_the_newest_step_on_one_device_dropless(run):
  assert run.step == 3 and run.mesh.size == 1 and run.tokenizer.eod_id == 256
  assert run.cfg.model.moe.dropless and run.cfg.data.seq_len == 32


def reference_greedy(model, prompt, new, window):
  """The argmax chain of the model on each context (right-padded to the window: the model
  is causal), with the window rule: a context longer than W keeps its newest W // 2."""
  ids, start = list(prompt), 0
  forward = jax.jit(lambda c: model(c, train=False)[0])
  for _ in range(new):
    if len(ids) - start > window:
      start = len(ids) - window // 2
    context = ids[start:]
    logits = forward(jnp.asarray(context + [0] * (window - len(context)), jnp.int32)[None])
    ids.append(int(np.argmax(np.asarray(logits[0, len(context) - 1]))))
  return ids[len(prompt):]


def test_greedy_with_cache_equals_without_and_the_exact_context_chain(run, prompts):
  """Three prompts of 30, 4 and 30 tokens, 24 new tokens in a 16-token window: every row
  shifts its context (the long ones already in the prompt)."""
  model = run.model()
  kwargs = dict(max_new_tokens=24, window=W, sampler=GREEDY)
  cached = sample_lib.generate(model, prompts, kv_cache=True, **kwargs)
  uncached = sample_lib.generate(model, prompts, kv_cache=False, **kwargs)
  assert cached == uncached
  assert all(len(row) == 24 for row in cached)
  # Row 1 alone, in an 8-token window: few distinct context lengths to compile.
  alone = sample_lib.generate(model, prompts[1:2], max_new_tokens=10, window=8)
  assert alone == [reference_greedy(model, prompts[1], 10, 8)]
  assert sample_lib.generate(model, prompts[1:2], max_new_tokens=10, window=8,
                             kv_cache=False) == alone


def np_filter(logits, top_k, top_p):
  """NumPy reference of top-k then nucleus filtering (kept: True)."""
  keep = np.ones_like(logits, bool)
  if top_k:
    keep &= logits >= np.sort(logits)[::-1][top_k - 1]
  if top_p < 1:
    masked = np.where(keep, logits, -np.inf)
    order = np.argsort(-masked)
    p = np.exp(masked[order] - masked[order[0]])
    p /= p.sum()
    nucleus = np.zeros_like(keep)
    total = 0.0
    for i, j in enumerate(order):
      nucleus[j] = True
      total += p[i]
      if total >= top_p:
        break
    keep &= nucleus
  return keep


@pytest.mark.parametrize('top_k,top_p', [(0, 1.0), (5, 1.0), (0, 0.7), (4, 0.5), (1, 1.0),
                                         (0, 0.01)])
def test_filter_logits_matches_numpy(top_k, top_p, rng):
  logits = rng.standard_normal((6, 17)).astype(np.float32) * 2
  got = np.asarray(sample_lib.filter_logits(jnp.asarray(logits), top_k, top_p))
  for row, out in zip(logits, got):
    keep = np_filter(row, top_k, top_p)
    np.testing.assert_array_equal(out > np.finfo(np.float32).min, keep)
    np.testing.assert_array_equal(out[keep], row[keep])


def test_draws_follow_the_filtered_softmax(rng):
  """8000 draws of one row: frequencies within 0.02 of softmax(logits / T) over the kept
  tokens."""
  logits = rng.standard_normal(7).astype(np.float32)
  sampler = sample_lib.Sampler(temperature=0.7, top_k=5, top_p=0.9)
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 8000)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: sample_lib.next_tokens(jnp.asarray(logits)[None], k[None], sampler)[0]))(keys))
  scaled = logits / 0.7
  keep = np_filter(scaled, 5, 0.9)
  p = np.where(keep, np.exp(scaled - scaled.max()), 0)
  p /= p.sum()
  np.testing.assert_allclose(np.bincount(draws, minlength=7) / 8000, p, atol=0.02)


def test_sampling_is_seeded_and_the_same_with_and_without_cache(run, prompts):
  model = run.model()
  sampler = sample_lib.Sampler(temperature=1.0, top_k=20, top_p=0.95)
  draw = lambda seed, kv_cache=True: sample_lib.generate(
      model, prompts, max_new_tokens=12, window=W, sampler=sampler, seed=seed,
      kv_cache=kv_cache)
  assert draw(1) == draw(1) == draw(1, kv_cache=False)
  assert draw(1) != draw(2)
  top1 = sample_lib.Sampler(temperature=1.0, top_k=1)
  assert sample_lib.generate(model, prompts, max_new_tokens=6, window=W, sampler=top1,
                             seed=5) == \
      sample_lib.generate(model, prompts, max_new_tokens=6, window=W, sampler=GREEDY)


def test_a_row_stops_at_the_stop_id_and_the_others_go_on(run, prompts):
  model = run.model()
  free = sample_lib.generate(model, prompts, max_new_tokens=8, window=W)
  stop = free[0][2]
  got = sample_lib.generate(model, prompts, max_new_tokens=8, window=W, stop_id=stop)
  assert got[0] == free[0][:free[0].index(stop) + 1]
  for want, row in zip(free[1:], got[1:]):
    assert row == (want[:want.index(stop) + 1] if stop in want else want)


def test_sample_text_and_errors(trained_run, run, tmp_path):
  texts = sample_lib.sample(trained_run, ['class ', 'x = '], max_new_tokens=5,
                            sampler=GREEDY)
  assert len(texts) == 2 and all(0 < len(t.encode()) <= 5 * 4 for t in texts)
  with pytest.raises(ConfigError, match='has no config.json'):
    sample_lib.sample(tmp_path, ['x'])
  model = run.model()
  with pytest.raises(ConfigError, match='a prompt is empty'):
    sample_lib.generate(model, [[1], []], max_new_tokens=1, window=8)
  for sampler, message in ((sample_lib.Sampler(temperature=-1.0), r'--temperature=-1.0'),
                           (sample_lib.Sampler(top_k=-2), r'--top_k=-2 must be'),
                           (sample_lib.Sampler(top_p=0.0), r'--top_p=0.0 must lie in')):
    with pytest.raises(ConfigError, match=message):
      sample_lib.generate(model, [[1]], max_new_tokens=1, window=8, sampler=sampler)
