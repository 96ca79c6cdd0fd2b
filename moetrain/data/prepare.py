"""Prepare: tokenize a text source once into token shards plus an index, in parallel worker
processes, resumably; and the cache that direct sources (stdlib, files, hub) prepare into.

A prepared directory holds:
  prepare.json      the plan, written first: source, tokenizer fingerprint, split, shard size
  train-00000.bin   the token ids of the shard's training documents, each followed by the
  eval-00000.bin    end-of-document id, as little-endian uint16 (uint32 when the vocabulary
                    needs it): raw arrays, `np.memmap(path, '<u2')` reads one
  shard-00000.json  the shard's counts, written after its token files: a shard with this file
                    is finished and is not redone when the same command runs again
  index.json        written last: format version, tokenizer fingerprint, dtype, the split, and
                    per shard its files, documents, tokens and bytes of text
Every file is written under a temporary name and renamed, so a file with its final name is
whole. Shards are consecutive runs of documents of about data.shard_mb MB of text, in the
source's order; document k of the source is held out for eval by `is_eval_document(k)`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
import time
import types

import numpy as np

from moetrain import paths
from moetrain.config import ConfigError
from moetrain.data import sources
from moetrain.data.packing import is_eval_document, join_documents
from moetrain.data.tokenizers import ByteTokenizer, fingerprint, make_tokenizer

FORMAT = 'moetrain-tokens'
VERSION = 1
INDEX, PLAN = 'index.json', 'prepare.json'
SPLITS = ('train', 'eval')
SPLIT_RULE = ('document k is held out for eval when the keyed uniform of (seed, k) is below '
              'eval_fraction (moetrain.data.packing.is_eval_document)')


def token_dtype(vocab_size: int) -> str:
  """The smallest little-endian unsigned dtype that holds every token id."""
  return '<u2' if vocab_size <= 1 << 16 else '<u4'


def source_spec(d) -> dict:
  """What identifies a text source's documents: for files also each file's size and
  modification time, so a changed file is a new source."""
  common = dict(source=d.source, max_documents=d.max_documents)
  if d.source == 'stdlib':
    return dict(common, root=str(sources.stdlib_root()), python=sys.version)
  if d.source == 'files':
    files = sources.expand_paths(d.paths)
    stats = [os.stat(f) for f in files]
    return dict(common, format=sources.file_format(files, d.format), text_field=d.text_field,
                sample_by=d.sample_by,
                files=[dict(path=os.path.abspath(f), bytes=s.st_size, mtime_ns=s.st_mtime_ns)
                       for f, s in zip(files, stats)])
  if d.source == 'hub':
    return dict(common, name=d.hub_name, config=d.hub_config, split=d.hub_split,
                text_field=d.text_field)
  raise ConfigError(f"data.source={d.source!r} is already tokens; `moetrain data prepare` "
                    "reads a text source, so set data.source to 'stdlib', 'files' or 'hub'.")


def make_plan(cfg, tokenizer) -> dict:
  """Everything that decides the prepared files' contents."""
  d = cfg.data
  return dict(format=FORMAT, version=VERSION, source=source_spec(d),
              tokenizer=fingerprint(d, tokenizer), dtype=token_dtype(tokenizer.vocab_size),
              split=dict(seed=cfg.seed, eval_fraction=d.eval_fraction, rule=SPLIT_RULE),
              shard_mb=d.shard_mb)


def plan_key(plan: dict) -> str:
  """A short hex digest of the plan: the name of its cache directory."""
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: pathlib.Path, data):
  """Writes `data` (bytes or an array) to a temporary name beside `path`, then renames it
  to `path`."""
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  with open(tmp, 'wb') as f:
    f.write(memoryview(data).cast('B'))
  os.replace(tmp, path)


def write_json(path: pathlib.Path, obj: dict):
  write_atomic(path, (json.dumps(obj, indent=1) + '\n').encode())


def read_json(path: pathlib.Path) -> dict:
  """A JSON file written here; a damaged one is one sentence naming it."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} could not be read ({e}); delete it and run the same '
                      '`moetrain data prepare` command again.') from e


def text_shards(texts, shard_chars: int):
  """Groups consecutive texts into lists of at least shard_chars characters (the last list
  may hold fewer)."""
  shard, size = [], 0
  for text in texts:
    shard.append(text)
    size += len(text)
    if size >= shard_chars:
      yield shard
      shard, size = [], 0
  if shard:
    yield shard


@dataclasses.dataclass
class ShardJob:
  number: int
  first_document: int  # the source-order number of the shard's first document.
  texts: list
  directory: str
  tokenizer: str  # data.tokenizer
  tokenizer_sha256: str  # its fingerprint: a changed file is another tokenizer.
  dtype: str
  seed: int
  eval_fraction: float
  bpe_encoder: str  # data.bpe_encoder


_TOKENIZERS = {}  # (data.tokenizer, sha256, data.bpe_encoder) -> tokenizer, made once per
# process.


def shard_name(split: str, number: int) -> str:
  return f'{split}-{number:05d}.bin'


def encode_documents(tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, int]:
  """(the texts' tokens, each document followed by the end-of-document id, as `dtype`;
  the texts' UTF-8 bytes). Byte tokens are read straight from the encoded bytes (no int32
  copy per document, no second encoding to count bytes)."""
  if isinstance(tokenizer, ByteTokenizer):
    encoded = [np.frombuffer(t.encode('utf-8'), np.uint8) for t in texts]
    return (join_documents(encoded, tokenizer.eod_id, dtype),
            sum(len(e) for e in encoded))
  tokens = join_documents(tokenizer.encode_batch(texts), tokenizer.eod_id, dtype)
  return tokens, sum(len(t.encode('utf-8')) for t in texts)


def encoder(tokenizer_name: str, bpe_encoder: str):
  """The tokenizer of data.tokenizer, encoding through tiktoken when data.bpe_encoder says
  so (a ConfigError when it cannot)."""
  tokenizer = make_tokenizer(types.SimpleNamespace(tokenizer=tokenizer_name))
  if bpe_encoder == 'tiktoken':
    from moetrain.data.tiktoken_bpe import TiktokenBPE
    return TiktokenBPE(tokenizer, tokenizer_name)
  return tokenizer


def write_shard(job: ShardJob) -> dict:
  """Tokenizes one shard's documents, writes its train and eval token files, then its
  shard-N.json; returns that JSON's contents."""
  key = (job.tokenizer, job.tokenizer_sha256, job.bpe_encoder)
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = encoder(job.tokenizer, job.bpe_encoder)
  held_out = is_eval_document(job.first_document + np.arange(len(job.texts)),
                              job.eval_fraction, job.seed)
  directory = pathlib.Path(job.directory)
  meta = dict(number=job.number, first_document=job.first_document, documents=len(job.texts))
  for split, chosen in zip(SPLITS, (~held_out, held_out)):
    picked = np.flatnonzero(chosen)
    tokens, text_bytes = encode_documents(_TOKENIZERS[key],
                                          [job.texts[i] for i in picked], job.dtype)
    name = shard_name(split, job.number)
    write_atomic(directory / name, tokens)
    meta[split] = dict(file=name, documents=len(picked), tokens=len(tokens), bytes=text_bytes)
  write_json(directory / f'shard-{job.number:05d}.json', meta)
  return meta


def shard_problem(directory: pathlib.Path, meta: dict, itemsize: int) -> str | None:
  """Why a finished shard's token files cannot be read (missing, or another size than its
  token count says), or None."""
  for split in SPLITS:
    path = directory / meta[split]['file']
    expected = meta[split]['tokens'] * itemsize
    if not path.is_file():
      return f'{path} is missing'
    size = path.stat().st_size
    if size != expected:
      return f'{path} holds {size} bytes, not the {expected} its index lists (truncated?)'
  return None


def claim_directory(out: pathlib.Path, plan: dict, where: str) -> dict | None:
  """Makes `out` the directory of `plan`: creates it and writes prepare.json, or checks that
  an existing one holds the same plan. Returns its index when it is finished and whole (a
  damaged shard loses its shard-N.json and the index, so it is prepared again)."""
  if (out / PLAN).is_file() or (out / INDEX).is_file():
    found = read_json(out / (INDEX if (out / INDEX).is_file() else PLAN))
    differs = [k for k in plan if found.get(k) != plan[k]]
    if differs:
      raise ConfigError(f'{where}={str(out)!r} already holds tokens prepared with another '
                        f'{", ".join(differs)}; choose another directory (it is left as it '
                        'is).')
    if not (out / INDEX).is_file():
      return None
    index = found
    itemsize = np.dtype(index['dtype']).itemsize
    damaged = [m for m in index['shards'] if shard_problem(out, m, itemsize)]
    if not damaged:
      return index
    for meta in damaged:
      (out / f'shard-{meta["number"]:05d}.json').unlink(missing_ok=True)
    (out / INDEX).unlink()
    return None
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConfigError(f'{where}={str(out)!r} exists and is not a directory prepared by '
                      'moetrain; choose a new or empty directory.')
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / PLAN, plan)
  return None


def finished_shards(out: pathlib.Path, itemsize: int) -> dict[int, dict]:
  """shard number -> its shard-N.json, for the shards whose token files are whole."""
  done = {}
  for path in out.glob('shard-*.json'):
    meta = read_json(path)
    if shard_problem(out, meta, itemsize) is None:
      done[meta['number']] = meta
  return done


def resolve_workers(requested: int) -> int:
  return requested or os.cpu_count() or 1


def prepare(cfg, output, *, where: str = '--output', progress: bool = True,
            log=print) -> dict:
  """Tokenizes the configured text source into `output` (see the module docstring) with
  data.prepare_workers processes and returns the index. Run again after an interruption, it
  redoes only unfinished shards; on a finished directory it only checks the files."""
  if paths.is_cloud(output):
    raise ConfigError(f'{where}={output} is in a bucket, but prepared token files are '
                      'memory-mapped from a local disk; prepare into a local folder (or '
                      'one every host mounts).')
  d = cfg.data
  tokenizer = make_tokenizer(d)
  if d.bpe_encoder == 'tiktoken':
    encoder(d.tokenizer, d.bpe_encoder)  # a tokenizer tiktoken cannot encode stops here.
  plan = make_plan(cfg, tokenizer)
  out = pathlib.Path(output)
  index = claim_directory(out, plan, where)
  if index is not None:
    return index
  itemsize = np.dtype(plan['dtype']).itemsize
  done = finished_shards(out, itemsize)
  if done:
    log(f'resuming {out}: {len(done)} shards are finished and are kept')
  start = time.perf_counter()
  shards = text_shards(sources.iter_texts(d), d.shard_mb * 10**6)
  head = list(itertools.islice(shards, 2))
  workers = resolve_workers(d.prepare_workers) if len(head) > 1 else 1
  job = lambda number, first, texts: ShardJob(
      number, first, texts, str(out), d.tokenizer, plan['tokenizer']['sha256'],
      plan['dtype'], cfg.seed, d.eval_fraction, d.bpe_encoder)
  from tqdm import tqdm
  bar = tqdm(desc=f'tokenizing into {out}', unit='MB', disable=not progress,
             bar_format='{desc}: {n:.0f} MB of text [{elapsed}, {rate_fmt}]')
  metas = dict(done)
  with contextlib.ExitStack() as stack:
    pool = None
    if workers > 1:
      pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context('spawn')))
    pending, first, count = {}, 0, 0
    for number, texts in enumerate(itertools.chain(head, shards)):
      count += 1
      size = sum(len(t) for t in texts) / 1e6  # characters: the progress bar's MB.
      if number in done:
        if done[number]['first_document'] != first or done[number]['documents'] != len(texts):
          raise ConfigError(f'{out}/shard-{number:05d}.json does not match the source (it '
                            'changed since the shard was written); choose a new directory.')
        bar.update(size)
      elif pool is None:
        metas[number] = write_shard(job(number, first, texts))
        bar.update(size)
      else:
        pending[pool.submit(write_shard, job(number, first, texts))] = size
        while len(pending) > workers:
          finished, _ = concurrent.futures.wait(
              pending, return_when=concurrent.futures.FIRST_COMPLETED)
          for future in finished:
            metas[future.result()['number']] = future.result()
            bar.update(pending.pop(future))
      first += len(texts)
    for future in concurrent.futures.as_completed(pending):
      metas[future.result()['number']] = future.result()
      bar.update(pending[future])
  bar.close()
  if not count:
    raise ConfigError(f'data.source={d.source!r} gave no documents (empty files or text '
                      'column); point data.paths or data.hub_name at non-empty data.')
  ordered = [metas[n] for n in range(count)]
  totals = {split: {k: sum(m[split][k] for m in ordered) for k in ('documents', 'tokens',
                                                                    'bytes')}
            for split in SPLITS}
  index = dict(plan, shards=ordered, totals=totals)
  write_json(out / INDEX, index)
  seconds = time.perf_counter() - start
  written = sum(m[s]['bytes'] for m in ordered if m['number'] not in done for s in SPLITS) / 1e6
  log(f'prepared {out}: {sum(m["documents"] for m in ordered):,} documents '
      f'({totals["eval"]["documents"]:,} held out for eval), {totals["train"]["tokens"]:,} '
      f'training and {totals["eval"]["tokens"]:,} eval tokens in {len(ordered)} '
      f'shard{"s" if len(ordered) > 1 else ""}; {written:,.1f} MB of text in {seconds:.1f} s '
      f'({written / max(seconds, 1e-9):,.1f} MB/s, {workers} worker{"s" if workers > 1 else ""})')
  return index


def cache_root(d) -> pathlib.Path:
  """data.cache_dir, else $MOETRAIN_CACHE, else $XDG_CACHE_HOME/moetrain or
  ~/.cache/moetrain; tokens live in its `tokens/` folder."""
  root = d.cache_dir or os.environ.get('MOETRAIN_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'moetrain')
  return pathlib.Path(root).expanduser() / 'tokens'


def prepare_cached(cfg, *, progress: bool = False, log=None) -> pathlib.Path:
  """The prepared directory of a text source in the cache (`<source>-<plan digest>`),
  tokenized on first use. Processes sharing the cache take turns under a file lock, so only
  the first one tokenizes."""
  d = cfg.data
  root = cache_root(d)
  out = root / f'{d.source}-{plan_key(make_plan(cfg, make_tokenizer(d)))}'
  root.mkdir(parents=True, exist_ok=True)
  with open(root / f'{out.name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / INDEX).is_file() and log:
      log(f'tokenizing data.source={d.source!r} once into {out}')
    prepare(cfg, out, where='data.cache_dir', progress=progress, log=log or (lambda *a: None))
  return out
