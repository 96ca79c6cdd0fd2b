"""Data at pretraining scale, in one run: prepare throughput, start-up and peak memory of
training from prepared corpora of two sizes, the loader's tokens/s against what training
consumes, and the token-file format comparison that chose raw token files.

  python bench/data_scale.py [--sizes_mb=10,1000] [--bpe_mb=64] [--repeats=2]
      [--bpe_encoders=tiktoken,tokenizers] [--steps=20] [--workdir=DIR] [--keep] [--skip_formats] [--json=out.json]

1. Corpora: jsonl files of the Python standard library's .py sources repeated, each copy's
   documents prefixed with '# copy K of PATH' (no two documents are equal), cut at the size.
2. `moetrain data prepare` of each corpus with byte tokens (data.prepare_workers=0: one
   worker per core): MB of text per second from its first read to its index (the rate the
   command prints), and per second of the whole command.
3. A 32k BPE from `moetrain tokenizer train` (default config: the standard library), then
   `moetrain data prepare` of the first --bpe_mb MB with it, once per --bpe_encoders value
   (data.bpe_encoder: tiktoken, tokenizers); the token counts of the two must agree.
4. `moetrain train --config=configs/tiny.py` from each prepared corpus, --repeats times,
   interleaved: start-up = seconds from starting the command to the first step's record in
   metrics.jsonl (log_every=1); peak RSS of the process; training tokens/s (median of the
   logged steps after the fifth).
5. The loader alone on the largest corpus with the tiny config's shapes (prefetch on),
   document_mask off and on: tokens/s, and its ratio to the training tokens/s of step 4.
6. Formats: 50M tokens of the largest corpus written as a raw .bin (what `prepare` writes)
   and as ArrayRecord (one record per row, read through grain's ArrayRecordDataSource and
   array_record's reader); write MB/s and random rows/s of each (needs `pip install
   moetrain[bench]`; skipped when grain is not installed).
Prints the tables and the targets, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moetrain import config as config_lib  # noqa: E402
from moetrain import data as data_lib  # noqa: E402
from moetrain.metrics import read_jsonl  # noqa: E402

RSS_WRAPPER = ('import resource, subprocess, sys\n'
               'code = subprocess.run(sys.argv[1:]).returncode\n'
               'print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n'
               'sys.exit(code)\n')


def moetrain_command(*args) -> list[str]:
  return [sys.executable, '-m', 'moetrain.cli', *args]


def environment() -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
  env.pop('XLA_FLAGS', None)  # one CPU device, as configs/tiny.py trains by default.
  return env


def write_corpus(path: pathlib.Path, megabytes: float) -> float:
  """Writes a jsonl of repeated standard-library documents with per-copy prefixes until it
  holds `megabytes` MB of text; returns the MB of text written."""
  documents = data_lib.stdlib_documents()
  limit, written, copy = megabytes * 1e6, 0, 0
  with open(path, 'w') as f:
    while written < limit:
      for name, text in documents:
        text = f'# copy {copy} of {name}\n{text}'
        f.write(json.dumps({'text': text}) + '\n')
        written += len(text.encode('utf-8'))
        if written >= limit:
          break
      copy += 1
  return written / 1e6


def config_file(path: pathlib.Path, **data) -> str:
  """A config file: configs/tiny.py's defaults with the given data keys."""
  lines = ''.join(f'  c.data.{key} = {value!r}\n' for key, value in data.items())
  path.write_text('from moetrain.config import default_config\n\n\ndef get_config():\n'
                  f'  c = default_config()\n{lines}  c.train.progress = False\n  return c\n')
  return str(path)


def children_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: pathlib.Path) -> tuple[float, float]:
  """Runs a command (output to `log`); returns its wall seconds and the CPU seconds of it
  and its processes."""
  start, cpu = time.perf_counter(), children_cpu_seconds()
  with open(log, 'w') as out:
    code = subprocess.run(command, cwd=ROOT, env=environment(), stdout=out,
                          stderr=subprocess.STDOUT).returncode
  seconds = time.perf_counter() - start
  if code:
    raise SystemExit(f'{" ".join(command)} failed; see {log}')
  return seconds, children_cpu_seconds() - cpu


def prepare(work: pathlib.Path, corpus: pathlib.Path, name: str, tokenizer='byte',
            bpe_encoder='tokenizers') -> dict:
  config = config_file(work / f'{name}.py', source='files', paths=str(corpus),
                       tokenizer=tokenizer, bpe_encoder=bpe_encoder)
  out = work / name
  log = work / f'{name}.log'
  seconds, cpu_seconds = run(moetrain_command('data', 'prepare', f'--config={config}',
                                              f'--output={out}'), log)
  index = json.loads((out / 'index.json').read_text())
  text_mb = sum(index['totals'][s]['bytes'] for s in ('train', 'eval')) / 1e6
  # The command's own line: '... MB of text in S s (...)', from the first read to the index.
  work_seconds = float(log.read_text().split(' MB of text in ')[-1].split(' s ')[0])
  return dict(name=name, dir=str(out), text_mb=text_mb, command_s=seconds,
              prepare_s=work_seconds, mb_per_s=text_mb / work_seconds,
              command_mb_per_s=text_mb / seconds, cpu_s=cpu_seconds,
              mb_per_cpu_s=text_mb / cpu_seconds, shards=len(index['shards']),
              tokens=sum(index['totals'][s]['tokens'] for s in ('train', 'eval')))


def train_from(work: pathlib.Path, prepared: str, steps: int, tag: str) -> dict:
  """Start-up seconds, peak RSS and training tokens/s of configs/tiny.py from `prepared`."""
  workdir = work / f'train-{tag}'
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, '-c', RSS_WRAPPER, *moetrain_command(
      'train', '--config=configs/tiny.py', f'--workdir={workdir}',
      '--config.data.source=prepared', f'--config.data.paths={prepared}',
      f'--config.train.steps={steps}', '--config.train.warmup_steps=1',
      '--config.train.log_every=1',
      '--config.train.eval_every=100000', '--config.train.progress=False')]
  metrics = workdir / 'metrics.jsonl'
  start = time.perf_counter()
  log = work / f'train-{tag}.log'
  with open(log, 'w') as out:
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=out,
                               stderr=subprocess.STDOUT)
    first_step = None
    while process.poll() is None:
      if first_step is None and metrics.is_file() and '"step": 1,' in metrics.read_text():
        first_step = time.perf_counter() - start
      time.sleep(0.02)
  if process.returncode:
    raise SystemExit(f'training from {prepared} failed; see {log}')
  rss_kb = int(log.read_text().split('MAXRSS_KB')[-1].split()[0])
  rates = [r['tokens_per_second'] for r in read_jsonl(metrics)
           if r['step'] > 5 and 'tokens_per_second' in r]
  shutil.rmtree(workdir, ignore_errors=True)
  return dict(startup_s=first_step, peak_rss_mb=rss_kb / 1024,
              train_tokens_per_s=statistics.median(rates))


def loader_rate(prepared: str, document_mask: bool, batches: int) -> float:
  """tokens/s of next() on the training iterator of configs/tiny.py's shapes."""
  cfg = config_lib.load(ROOT / 'configs/tiny.py')
  cfg.data.source, cfg.data.paths, cfg.data.document_mask = 'prepared', prepared, document_mask
  data = data_lib.make_data(config_lib.validate(cfg), 0, 1)
  next(data.train)  # starts the prefetch thread.
  start = time.perf_counter()
  for _ in range(batches):
    next(data.train)
  seconds = time.perf_counter() - start
  data.train.close()
  return batches * cfg.data.batch_size * cfg.data.seq_len / seconds


def formats(work: pathlib.Path, prepared: str, num_tokens: int, reads: int) -> dict:
  """Raw token file vs ArrayRecord: write MB/s and random-row reads/s (rows of 129 tokens)."""
  try:
    import grain.python as grain
    from array_record.python import array_record_module
  except ImportError:
    return {}
  width = 129
  index = json.loads((pathlib.Path(prepared) / 'index.json').read_text())
  files = data_lib.TokenFiles([pathlib.Path(prepared) / m['train']['file']
                               for m in index['shards']],
                              [m['train']['tokens'] for m in index['shards']], index['dtype'])
  tokens = files.read(0, min(num_tokens, len(files))).astype('<u2')
  rows = len(tokens) // width
  mb = tokens.nbytes / 1e6
  rng = np.random.default_rng(0)
  picks = rng.integers(0, rows, reads)
  result = {}
  raw = work / 'format.bin'
  start = time.perf_counter()
  tokens.tofile(raw)
  os.sync()
  result['raw_write_mb_per_s'] = mb / (time.perf_counter() - start)
  start = time.perf_counter()
  for r in picks:
    np.fromfile(raw, '<u2', width, offset=int(r) * width * 2)
  result['raw_rows_per_s'] = reads / (time.perf_counter() - start)
  mapped = np.memmap(raw, '<u2', 'r')
  start = time.perf_counter()
  for r in picks:
    np.array(mapped[int(r) * width:(int(r) + 1) * width])
  result['memmap_rows_per_s'] = reads / (time.perf_counter() - start)
  record_path = work / 'format.arrayrecord'
  start = time.perf_counter()
  writer = array_record_module.ArrayRecordWriter(str(record_path), 'group_size:1')
  for r in range(rows):
    writer.write(tokens[r * width:(r + 1) * width].tobytes())
  writer.close()
  os.sync()
  result['arrayrecord_write_mb_per_s'] = mb / (time.perf_counter() - start)
  reader = array_record_module.ArrayRecordReader(str(record_path), 'readahead_buffer_size:0')
  start = time.perf_counter()
  for i in range(0, reads, 16):
    [np.frombuffer(b, '<u2') for b in reader.read([int(r) for r in picks[i:i + 16]])]
  result['arrayrecord_reader_rows_per_s'] = reads / (time.perf_counter() - start)
  reader.close()
  source = grain.ArrayRecordDataSource([str(record_path)])
  few = picks[:max(1, reads // 10)]
  start = time.perf_counter()
  for r in few:
    np.frombuffer(source[int(r)], '<u2')
  result['grain_source_rows_per_s'] = len(few) / (time.perf_counter() - start)
  result['mb'] = mb
  for path in (raw, record_path):
    path.unlink()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes_mb', default='10,1000')
  parser.add_argument('--bpe_mb', type=float, default=64)
  parser.add_argument('--bpe_vocab', type=int, default=32768)
  parser.add_argument('--bpe_encoders', default='tiktoken,tokenizers',
                      help='data.bpe_encoder values to prepare the BPE corpus with.')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--loader_batches', type=int, default=2000)
  parser.add_argument('--format_tokens', type=int, default=50_000_000)
  parser.add_argument('--workdir', default=None, help='default: a new folder in /tmp.')
  parser.add_argument('--keep', action='store_true', help='keep the generated data.')
  parser.add_argument('--skip_formats', action='store_true')
  parser.add_argument('--json', default=None, help='also write the results here.')
  args = parser.parse_args()
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='moetrain-data-scale-'))
  work.mkdir(parents=True, exist_ok=True)
  sizes = [float(s) for s in args.sizes_mb.split(',')]
  result = dict(cpus=os.cpu_count(), sizes_mb=sizes)
  try:  # on failure the folder stays, with the logs.
    corpora = {}
    for size in sizes:
      corpora[size] = work / f'corpus-{size:g}mb.jsonl'
      write_corpus(corpora[size], size)
    prepared = {size: prepare(work, corpora[size], f'tok-{size:g}mb') for size in sizes}
    bpe = work / 'bpe32k.json'
    run(moetrain_command('tokenizer', 'train', '--config=configs/tiny.py',
                         f'--vocab_size={args.bpe_vocab}', f'--output={bpe}'),
        work / 'bpe-train.log')
    bpe_corpus = work / 'corpus-bpe.jsonl'
    write_corpus(bpe_corpus, args.bpe_mb)
    for encoder in args.bpe_encoders.split(','):
      prepared[f'bpe-{encoder}'] = prepare(work, bpe_corpus, f'tok-bpe-{encoder}',
                                           tokenizer=str(bpe), bpe_encoder=encoder)
    bpe_tokens = {p['tokens'] for k, p in prepared.items() if str(k).startswith('bpe')}
    if len(bpe_tokens) > 1:
      raise SystemExit(f'the BPE encoders wrote different token counts: {bpe_tokens}')
    result['prepare'] = {str(k): v for k, v in prepared.items()}
    training = {size: [] for size in sizes}
    for repeat in range(args.repeats):
      for size in sizes:
        training[size].append(train_from(work, prepared[size]['dir'], args.steps,
                                         f'{size:g}-{repeat}'))
    summary = {size: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for size, runs in training.items()}
    result['training'] = {str(k): dict(v, runs=training[k]) for k, v in summary.items()}
    largest, smallest = max(sizes), min(sizes)
    result['startup_ratio'] = summary[largest]['startup_s'] / summary[smallest]['startup_s']
    result['rss_ratio'] = summary[largest]['peak_rss_mb'] / summary[smallest]['peak_rss_mb']
    train_rate = statistics.median(r['train_tokens_per_s'] for runs in training.values()
                                   for r in runs)
    result['train_tokens_per_s'] = train_rate
    result['loader_tokens_per_s'] = {
        mask: loader_rate(prepared[largest]['dir'], mask, args.loader_batches)
        for mask in (False, True)}
    result['loader_ratio'] = min(result['loader_tokens_per_s'].values()) / train_rate
    if not args.skip_formats:
      result['formats'] = formats(work, prepared[largest]['dir'], args.format_tokens, 20000)
  except BaseException:
    print(f'stopped; the generated data and logs are in {work}', file=sys.stderr)
    raise
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)
  report(result)
  print(json.dumps(result))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


def report(r: dict):
  print(f'prepare ({r["cpus"]} cores): MB of text / seconds from the first read to the index;'
        ' the whole command: seconds, CPU seconds of all its processes, MB per CPU second')
  for name, p in r['prepare'].items():
    print(f'  {p["name"]:<10} {p["text_mb"]:>8,.1f} MB {p["prepare_s"]:>7.1f} s '
          f'{p["mb_per_s"]:>6.1f} MB/s   command {p["command_s"]:6.1f} s, CPU '
          f'{p["cpu_s"]:6.1f} s, {p["mb_per_cpu_s"]:5.1f} MB/CPU-s   shards {p["shards"]}, '
          f'tokens {p["tokens"]:,}')
  print('training configs/tiny.py from each prepared corpus (median of the repeats):')
  for size, t in r['training'].items():
    print(f'  {float(size):>7g} MB  start-up {t["startup_s"]:6.1f} s   peak RSS '
          f'{t["peak_rss_mb"]:7.0f} MB   {t["train_tokens_per_s"]:8,.0f} tokens/s')
  loader = r['loader_tokens_per_s']
  print(f'loader: {loader[False]:,.0f} tokens/s ({loader[True]:,.0f} with document_mask); '
        f'training consumes {r["train_tokens_per_s"]:,.0f} tokens/s')
  byte_rate = r['prepare'][str(max(r['sizes_mb']))]['mb_per_s']
  checks = [('start-up ratio (largest / smallest)', r['startup_ratio'], '<=', 1.2),
            ('peak RSS ratio (largest / smallest)', r['rss_ratio'], '<=', 1.2),
            ('prepare MB/s, byte tokens', byte_rate, '>=', 20),
            *[(f'prepare MB/s, 32k BPE, {p["name"].removeprefix("tok-bpe-")}',
               p['mb_per_s'], '>=', 5) for k, p in r['prepare'].items() if k.startswith('bpe')],
            ('loader / training tokens/s', r['loader_ratio'], '>=', 20)]
  for name, value, op, target in checks:
    ok = value <= target if op == '<=' else value >= target
    print(f'  {name:<38} {value:9.2f}  target {op} {target:<5g} {"ok" if ok else "MISSED"}')
  if r.get('formats'):
    f = r['formats']
    print(f'formats ({f["mb"]:.0f} MB of uint16 tokens, rows of 129 tokens read at random):')
    print(f'  raw .bin      write {f["raw_write_mb_per_s"]:7.1f} MB/s   np.fromfile '
          f'{f["raw_rows_per_s"]:9,.0f} rows/s   np.memmap {f["memmap_rows_per_s"]:9,.0f} rows/s')
    print(f'  ArrayRecord   write {f["arrayrecord_write_mb_per_s"]:7.1f} MB/s   reader '
          f'{f["arrayrecord_reader_rows_per_s"]:9,.0f} rows/s   grain source '
          f'{f["grain_source_rows_per_s"]:9,.0f} rows/s')


if __name__ == '__main__':
  main()
