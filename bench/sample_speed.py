"""Sampling speed with and without the key-value cache, in one run.

  PYTHONPATH=. python bench/sample_speed.py [--config=configs/tiny.py] [--new_tokens=256]
      [--batch=1] [--prompt_tokens=16] [--repeats=3] [--json=out.json]

Builds the config's model (random weights, MoE dropless as `moetrain sample` runs it),
compiles both paths, then times greedy generation of --new_tokens tokens after a random
prompt (median of --repeats runs each), checks that both paths give the same tokens, and
prints the times and the ratio (no-cache seconds / cache seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flax import nnx

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import sample as sample_lib
from moetrain.model.transformer import Transformer


def timed(fn, repeats: int) -> tuple[float, object]:
  """Median seconds of `repeats` calls of fn() after one warm-up call (compiles), and its
  last result."""
  fn()
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--new_tokens', type=int, default=256)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--prompt_tokens', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default=None, help='also write the results here.')
  args = parser.parse_args()
  cfg = data_lib.resolve_vocab(config_lib.validate(config_lib.load(args.config)))
  if cfg.model.num_experts and cfg.model.moe.router == 'token_choice':
    cfg.model.moe.dropless = True
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  prompts = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.prompt_tokens)).tolist()
  window = cfg.data.seq_len
  run = lambda kv_cache: lambda: sample_lib.generate(
      model, prompts, max_new_tokens=args.new_tokens, window=window, kv_cache=kv_cache)
  cached_s, cached = timed(run(True), args.repeats)
  full_s, full = timed(run(False), args.repeats)
  result = dict(config=args.config, batch=args.batch, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, window=window, cache_s=cached_s,
                no_cache_s=full_s, ratio=full_s / cached_s, same_tokens=cached == full)
  print(f'{args.config}: batch {args.batch}, prompt {args.prompt_tokens} tokens, '
        f'{args.new_tokens} new tokens, window {window} (greedy, median of {args.repeats})')
  print(f'with KV cache     {cached_s:7.3f} s  {args.batch * args.new_tokens / cached_s:8.1f} '
        'tokens/s')
  print(f'without KV cache  {full_s:7.3f} s  {args.batch * args.new_tokens / full_s:8.1f} '
        'tokens/s')
  print(f'ratio {result["ratio"]:.1f}x, same tokens: {result["same_tokens"]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
