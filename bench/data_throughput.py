"""Input pipeline throughput vs what training consumes.

  python bench/data_throughput.py [--config=configs/tiny.py] [--batches=2000]
      [--train_tokens_per_s=10000] [--tokenizer=byte|PATH] [--json=out.json]

Measures, for the config's data section (document_mask off and on):
  startup   seconds of make_data: read the corpus, tokenize, pack (and its tokens/s);
  steady    tokens/s of next(data.train) over --batches batches (prefetch thread included);
and compares the steady rate with the training consumption (default: the ~4k tokens/s that
configs/tiny.py trains at on the 2-core CPU machines). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

from moetrain import config as config_lib
from moetrain import data as data_lib


def measure(cfg, num_batches: int) -> dict:
  """Startup seconds and steady-state tokens/s of the pipeline for cfg (one process)."""
  start = time.perf_counter()
  data = data_lib.make_data(cfg, 0, 1)
  startup = time.perf_counter() - start
  tokens_per_batch = cfg.data.batch_size * cfg.data.seq_len
  next(data.train)  # starts the prefetch thread.
  start = time.perf_counter()
  for _ in range(num_batches):
    next(data.train)
  seconds = time.perf_counter() - start
  data.train.close()
  return dict(document_mask=cfg.data.document_mask, startup_s=startup,
              startup_tokens_per_s=data.num_train_tokens / startup,
              steady_tokens_per_s=num_batches * tokens_per_batch / seconds,
              train_tokens=data.num_train_tokens)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--batches', type=int, default=2000)
  parser.add_argument('--train_tokens_per_s', type=float, default=10000.0,
                      help='tokens/s training consumes (configs/tiny.py: 9,248 on a 2-core CPU).')
  parser.add_argument('--tokenizer', default=None, help='override data.tokenizer.')
  parser.add_argument('--json', default=None, help='also write the results here.')
  args = parser.parse_args()
  base = config_lib.load(args.config)
  if args.tokenizer:
    base.data.tokenizer = args.tokenizer
  rows = []
  for document_mask in (False, True):
    cfg = base.copy_and_resolve_references()
    cfg.data.document_mask = document_mask
    row = measure(config_lib.validate(cfg), args.batches)
    row['ratio'] = row['steady_tokens_per_s'] / args.train_tokens_per_s
    rows.append(row)
  print(f'config {args.config}: batch {base.data.batch_size} x seq {base.data.seq_len}, '
        f'tokenizer {base.data.tokenizer}, prefetch {base.data.prefetch}; training consumes '
        f'{args.train_tokens_per_s:,.0f} tokens/s')
  print(f'{"document_mask":>13} {"startup s":>10} {"startup tok/s":>14} '
        f'{"steady tok/s":>14} {"x training":>11}')
  for r in rows:
    print(f'{str(r["document_mask"]):>13} {r["startup_s"]:>10.2f} '
          f'{r["startup_tokens_per_s"]:>14,.0f} {r["steady_tokens_per_s"]:>14,.0f} '
          f'{r["ratio"]:>10,.0f}x')
  ok = all(r['ratio'] >= 10 for r in rows)
  print('input pipeline is', 'at least' if ok else 'LESS than', '10x the training rate')
  result = dict(config=args.config, train_tokens_per_s=args.train_tokens_per_s, rows=rows)
  print(json.dumps(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
