"""Sources: the documents of a corpus, in a fixed order.

  stdlib  the Python standard library's own `.py` source (found through `sysconfig`, test
          suites excluded): present wherever Python is, nothing is downloaded.
  files   local files through HF `datasets` (`text`, `json`/`jsonl`, `parquet`), given as
          comma-separated globs in `data.paths`; `data.text_field` names the text column.
  hub     a hub dataset by `data.hub_name` / `hub_config` / `hub_split`, streamed.
For local sources the HF offline switches are set, so no network request is made.
Undecodable bytes become U+FFFD and are counted.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import logging
import os
import pathlib
import sys
import sysconfig
from collections.abc import Callable, Sequence

from moetrain.config import ConfigError

log = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})
COMPRESSION_SUFFIXES = ('.gz', '.bz2', '.xz', '.zst', '.lz4')
FORMAT_BY_SUFFIX = {'.txt': 'text', '.text': 'text', '.md': 'text', '.rst': 'text',
                    '.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
REPLACE_ERRORS = 'moetrain.count_replace'  # codec error handler: U+FFFD, counted.


class ReplacementCounter:
  """A codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

  def __init__(self):
    self.count = 0

  def __call__(self, error: UnicodeDecodeError):
    self.count += error.end - error.start
    return '\ufffd', error.end


_REPLACED = ReplacementCounter()
codecs.register_error(REPLACE_ERRORS, _REPLACED)


def log_replacements(before: int, where: str):
  """Logs how many undecodable bytes were replaced since the counter read `before`."""
  replaced = _REPLACED.count - before
  if replaced:
    log.warning('replaced %d undecodable (non-UTF-8) bytes in %s with U+FFFD', replaced, where)


def open_binary(path: str):
  """The file opened for reading bytes, gzip/bz2/xz decompressed; None for compressions
  read only by HF datasets (.zst, .lz4)."""
  import bz2
  import gzip
  import lzma
  if path.lower().endswith(('.zst', '.lz4')):
    return None
  opener = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open}.get(
      pathlib.Path(path).suffix.lower(), open)
  return opener(path, 'rb')


def count_undecodable(path: str, chunk_bytes: int = 1 << 24) -> int:
  """Bytes of a file (gzip/bz2/xz decompressed; other compressions are not scanned) that
  are not valid UTF-8, counted in chunks."""
  f = open_binary(path)
  if f is None:
    return 0
  before = _REPLACED.count
  decoder = codecs.getincrementaldecoder('utf-8')(errors=REPLACE_ERRORS)
  with f:
    while chunk := f.read(chunk_bytes):
      decoder.decode(chunk)
  decoder.decode(b'', final=True)
  return _REPLACED.count - before


def check_json_lines(path: str):
  """Raises ConfigError naming the file and line of the first line of a JSON-lines file
  that is not an object (a bare `null` as the first line crashes the json reader of HF
  datasets outright). Files holding one JSON array are left to the reader."""
  f = open_binary(path)
  if f is None:
    return
  with f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if number == 1 and line.startswith(b'['):
        return
      if line and not line.startswith(b'{'):
        shown = line[:40].decode(errors='replace')
        raise ConfigError(f'{path} line {number} is not a JSON object ({shown!r}); make every '
                          'line an object with the data.text_field key, or drop it.')


def set_offline():
  """Sets HF's offline switches (environment and, if already imported, the libraries' own
  constants), so loading local data makes no network request."""
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  os.environ['HF_HUB_OFFLINE'] = '1'
  os.environ['HF_UPDATE_DOWNLOAD_COUNTS'] = '0'
  if 'datasets' in sys.modules:
    sys.modules['datasets'].config.HF_DATASETS_OFFLINE = True
    sys.modules['datasets'].config.HF_HUB_OFFLINE = True
  if 'huggingface_hub' in sys.modules:
    sys.modules['huggingface_hub'].constants.HF_HUB_OFFLINE = True


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_paths(max_documents: int = 0) -> list[pathlib.Path]:
  """The standard library's .py files (test suites and site-packages excluded), sorted; the
  first max_documents when it is set. Lists only: no file is read."""
  root = stdlib_root()
  paths = sorted(p for p in root.rglob('*.py')
                 if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  return paths[:max_documents] if max_documents else paths


def read_text_file(path: pathlib.Path) -> str:
  """A file's text; undecodable bytes become U+FFFD (counted)."""
  return path.read_bytes().decode('utf-8', errors=REPLACE_ERRORS)


def read_stdlib(paths: list[pathlib.Path]) -> list[str]:
  """The texts of the given standard library files, in order (replacements logged)."""
  before = _REPLACED.count
  texts = [read_text_file(p) for p in paths]
  log_replacements(before, f'the standard library ({stdlib_root()})')
  return texts


def stdlib_documents(max_documents: int = 0) -> list[tuple[str, str]]:
  """(relative path, text) of the standard library's .py files, sorted by path."""
  root, paths = stdlib_root(), stdlib_paths(max_documents)
  return [(str(p.relative_to(root)), t) for p, t in zip(paths, read_stdlib(paths))]


def expand_paths(paths: str) -> list[str]:
  """Files matched by comma-separated globs (`**` recurses), sorted, without duplicates."""
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise ConfigError("data.paths is empty; with data.source='files' set it to "
                      'comma-separated file globs, e.g. data.paths=corpus/*.jsonl.')
  files = []
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not matched:
      raise ConfigError(f'data.paths pattern {pattern!r} matches no file; fix the path or '
                        'the glob.')
    files += [m for m in matched if m not in files]
  return files


def file_format(files: list[str], fmt: str) -> str:
  """The HF builder ('text', 'json', 'parquet') for the files: data.format, or from the
  suffixes (after a compression suffix) when it is 'auto'."""
  if fmt != 'auto':
    return fmt
  found = set()
  for f in files:
    name = f.lower()
    for c in COMPRESSION_SUFFIXES:
      name = name.removesuffix(c)
    found.add(FORMAT_BY_SUFFIX.get(pathlib.Path(name).suffix, 'text'))
  if len(found) > 1:
    raise ConfigError(f'data.paths mixes formats ({", ".join(sorted(found))}); point it at '
                      'files of one format or set data.format.')
  return found.pop()


def _text_columns(ds, field: str, where: str):
  """Yields the `field` column of each batch of an iterable dataset, as lists of str (read
  as Arrow tables: several times faster than HF's per-row Python dicts); null and empty
  values are left out, any other value that is not text is a ConfigError naming its row."""
  import pyarrow as pa
  rows = 0
  for batch in ds.with_format('arrow').iter(batch_size=1024):
    if field not in batch.column_names:
      raise ConfigError(f'data.text_field={field!r} is not a column of {where} (columns: '
                        f'{", ".join(sorted(batch.column_names))}); set data.text_field to '
                        'the text column.')
    column = batch.column(field)
    values = column.to_pylist()
    if getattr(column.type, 'extension_name', '') == 'arrow.json':
      # A column of mixed types (text in most rows, a number or list in some) arrives as
      # the JSON text of each value.
      values = [None if v is None else json.loads(v) for v in values]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
      for i, t in enumerate(values):
        if t is not None and not isinstance(t, str):
          raise ConfigError(f'data.text_field={field!r} holds {type(t).__name__} {t!r:.40} '
                            f'instead of text in row {rows + i + 1} of {where}; fix that row '
                            'or set data.text_field to a text column.')
    rows += len(values)
    yield [t for t in values if t]


def _first_texts(ds, d, where: str):
  """Yields the non-empty texts of a dataset one by one, the first data.max_documents when
  it is set."""
  count = 0
  for column in _text_columns(ds, d.text_field, where):
    for text in column:
      yield text
      count += 1
      if d.max_documents and count >= d.max_documents:
        return


def file_texts(d):
  """A function that streams the non-empty texts of the local files in data.paths, in file
  order (nothing is cached); undecodable bytes become U+FFFD (counted, logged here once)."""
  files = expand_paths(d.paths)
  fmt = file_format(files, d.format)
  kwargs = {}
  if fmt in ('text', 'json'):
    # 'utf_8' (not 'utf-8') makes the json builder decode in Python, replacing bad bytes.
    kwargs = dict(encoding='utf_8', encoding_errors='replace')
    for f in files:
      if replaced := count_undecodable(f):
        log.warning('replaced %d undecodable (non-UTF-8) bytes in %s with U+FFFD', replaced, f)
      if fmt == 'json':
        check_json_lines(f)
  if fmt == 'text':
    kwargs['sample_by'] = d.sample_by

  def texts():
    from datasets import load_dataset
    try:
      ds = load_dataset(fmt, data_files=files, split='train', streaming=True, **kwargs)
      yield from _first_texts(ds, d, f'data.paths={d.paths!r}')
    except ConfigError:
      raise
    except Exception as e:  # malformed files: pyarrow / json errors of many types.
      raise ConfigError(f'data.paths={d.paths!r} could not be read as {fmt} '
                        f'({type(e).__name__}: {e}); fix the files or set data.format.') from e

  return texts


def hub_texts(d):
  """A function that streams the non-empty texts of a hub dataset split (the first
  data.max_documents when it is set, else the whole split)."""
  where = f'data.hub_name={d.hub_name!r}'

  def texts():
    from datasets import load_dataset
    try:
      ds = load_dataset(d.hub_name, d.hub_config or None, split=d.hub_split, streaming=True)
      yield from _first_texts(ds, d, where)
    except ConfigError:
      raise
    except Exception as e:  # offline, unknown name/config/split: many exception types.
      raise ConfigError(f'{where} (config {d.hub_config!r}, split {d.hub_split!r}) could '
                        f'not be loaded ({type(e).__name__}: {e}); check the name and that '
                        "this machine is online, or use data.source='files'.") from e

  return texts


def select_streamed(texts, indices) -> list[str]:
  """The texts at `indices` (any order) of the stream `texts()`, in the order of `indices`;
  only those are kept, and the stream stops after the last one."""
  wanted = set(int(i) for i in indices)
  found = {}
  if wanted:
    last = max(wanted)
    for i, text in enumerate(texts()):
      if i in wanted:
        found[i] = text
      if i >= last:
        break
  return [found[int(i)] for i in indices]


@dataclasses.dataclass
class Corpus:
  """The documents of a source: how many there are, and `read(indices)` -> the texts of
  only those documents (in the order of `indices`)."""
  num_documents: int
  read: Callable[[Sequence[int]], list[str]]


def open_corpus(d) -> Corpus:
  """The configured source's documents, counted in a fixed order without keeping texts:
  stdlib lists its files; files/hub stream the records once to count them (reading then
  streams them again, keeping only the selected texts)."""
  if d.source == 'stdlib':
    set_offline()
    paths = stdlib_paths(d.max_documents)
    corpus = Corpus(len(paths), lambda indices: read_stdlib([paths[i] for i in indices]))
  elif d.source in ('files', 'hub'):
    if d.source == 'files':
      set_offline()
    texts = file_texts(d) if d.source == 'files' else hub_texts(d)
    count = sum(1 for _ in texts())
    corpus = Corpus(count, lambda indices: select_streamed(texts, indices))
  else:
    raise ConfigError(f"data.source={d.source!r} is not a text source; use 'stdlib', "
                      "'files' or 'hub'.")
  if not corpus.num_documents:
    raise ConfigError(f'data.source={d.source!r} gave no documents (empty files or text '
                      'column); point data.paths or data.hub_name at non-empty data.')
  return corpus


def iter_texts(d):
  """Yields the texts of the configured source one by one, in its fixed order, keeping
  none: stdlib reads its files one at a time, files and hub are streamed."""
  if d.source == 'stdlib':
    set_offline()
    before = _REPLACED.count
    for path in stdlib_paths(d.max_documents):
      yield read_text_file(path)
    log_replacements(before, f'the standard library ({stdlib_root()})')
  elif d.source in ('files', 'hub'):
    if d.source == 'files':
      set_offline()
    yield from (file_texts(d) if d.source == 'files' else hub_texts(d))()
  else:
    raise ConfigError(f"data.source={d.source!r} is not a text source; use 'stdlib', "
                      "'files' or 'hub'.")


def load_documents(d) -> list[str]:
  """All texts of the configured source, in a fixed order."""
  corpus = open_corpus(d)
  return corpus.read(range(corpus.num_documents))
