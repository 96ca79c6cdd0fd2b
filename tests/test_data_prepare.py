"""`moetrain data prepare`, training from prepared directories and mixtures: parallel
prepare equals the direct source, resume of an interrupted prepare, the one-sentence errors
(before anything compiles), mixture proportions, tokens seen and their logging."""

import json
import os

import numpy as np
import pytest

from moetrain import cli
from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import step as step_lib
from moetrain import train as train_lib
from moetrain.config import ConfigError
from moetrain.data import mixture, prepare

from conftest import tiny_config
from data_helpers import batch_rows, files_config, make_texts, write_jsonl

SHARD_MB = 0.002  # ~2,000 characters: several shards of these small corpora.


def config_file(path, **data) -> str:
  """A config file with the test batch shapes and the given data keys. (Command-line
  overrides reach config_flags only through sys.argv, so in-process tests write files.)"""
  lines = ''.join(f'  c.data.{key} = {value!r}\n' for key, value in data.items())
  path.write_text(
      'from moetrain.config import default_config\n\n\ndef get_config():\n'
      '  c = default_config()\n'
      '  c.data.seq_len, c.data.batch_size, c.data.eval_fraction = 16, 4, 0.2\n'
      f'  c.train.eval_batches, c.train.progress = 2, False\n{lines}'
      '  return c\n')
  return str(path)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(directory, jsonl of 80 documents, that corpus prepared by the CLI in 2 processes)."""
  root = tmp_path_factory.mktemp('prepared')
  jsonl = write_jsonl(root / 'docs.jsonl', make_texts(80, seed=21))
  config = config_file(root / 'c.py', source='files', paths=str(jsonl), shard_mb=SHARD_MB,
                       prepare_workers=2)
  cli.main(['moetrain', 'data', 'prepare', f'--config={config}', f'--output={root / "tok"}'])
  return root, jsonl, root / 'tok'


def prepared_config(tiny, path, **overrides):
  return tiny(**{'data.source': 'prepared', 'data.paths': str(path), 'data.seq_len': 16,
                 'data.batch_size': 4, 'data.eval_fraction': 0.2, 'train.eval_batches': 2,
                 **overrides})


def test_parallel_prepare_and_the_direct_source_give_identical_batches(corpus, tiny):
  root, jsonl, out = corpus
  index = json.loads((out / 'index.json').read_text())
  assert len(index['shards']) > 4 and index['dtype'] == '<u2'
  assert index['tokenizer']['name'] == 'byte' and index['split']['eval_fraction'] == 0.2
  assert sum(m['documents'] for m in index['shards']) == 80
  for meta in index['shards']:
    for split in ('train', 'eval'):
      size = (out / meta[split]['file']).stat().st_size
      assert size == 2 * meta[split]['tokens']
  direct = data_lib.make_data(files_config(tiny, jsonl, **{'data.document_mask': True}), 0, 1)
  prepared = data_lib.make_data(prepared_config(tiny, out, **{'data.document_mask': True}), 0, 1)
  assert prepared.num_train_tokens == direct.num_train_tokens
  assert prepared.eval_unigram_entropy == direct.eval_unigram_entropy
  for a, b in zip(direct.eval_batches, prepared.eval_batches, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for _ in range(200):  # past the end of the first epoch.
    a, b = next(direct.train), next(prepared.train)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert prepared.num_train_tokens < 200 * 4 * 16
  for data in (direct, prepared):
    data.train.close()


def test_the_same_command_again_only_checks(corpus, capsys):
  root, jsonl, out = corpus
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  config = config_file(root / 'c1.py', source='files', paths=str(jsonl), shard_mb=SHARD_MB)
  cli.main(['moetrain', 'data', 'prepare', f'--config={config}', f'--output={out}'])
  assert 'train from it with --config.data.source=prepared' in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def shard_files(out, number):
  return [out / f'{kind}-{number:05d}.{ext}'
          for kind, ext in (('train', 'bin'), ('eval', 'bin'), ('shard', 'json'))]


def test_an_interrupted_prepare_finishes_without_redoing_shards(tmp_path, tiny):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(100, seed=22)),
                     **{'data.shard_mb': SHARD_MB, 'data.prepare_workers': 1})
  out = tmp_path / 'tok'
  index = prepare.prepare(cfg, out, progress=False, log=lambda *a: None)
  reference = {p.name: p.read_bytes() for p in out.iterdir()}
  stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
  # The state an interruption leaves: no index, shard 2 half written (its token file under
  # a temporary name, no shard-2.json), shard 5 not started.
  (out / 'index.json').unlink()
  train_2 = shard_files(out, 2)[0]
  os.replace(train_2, train_2.with_name('.train-00002.bin.tmp-123'))
  shard_files(out, 2)[2].unlink()
  for path in shard_files(out, 5):
    path.unlink()
  logged = []
  assert prepare.prepare(cfg, out, progress=False, log=logged.append) == index
  assert f'{len(index["shards"]) - 2} shards are finished and are kept' in logged[0]
  redone = {p.name for n in (2, 5) for p in shard_files(out, n)} | {'index.json'}
  for path in out.iterdir():
    if path.name.startswith('.'):
      continue  # the interrupted write's leftover.
    assert path.read_bytes() == reference[path.name]
    if path.name not in redone:
      assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamps[path.name], path.name


def test_a_damaged_shard_is_named_and_redone(tmp_path, tiny):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(60, seed=23)),
                     **{'data.shard_mb': SHARD_MB, 'data.prepare_workers': 1})
  out = tmp_path / 'tok'
  prepare.prepare(cfg, out, progress=False, log=lambda *a: None)
  train_cfg = prepared_config(tiny, out, **{'data.prefetch': 0})
  good = next(data_lib.make_data(train_cfg, 0, 1).train)
  train_1 = shard_files(out, 1)[0]
  data = train_1.read_bytes()
  train_1.write_bytes(data[:-7])
  message = error_of(train_cfg)
  assert message.startswith(f'{train_1} holds {len(data) - 7} bytes, not the {len(data)} its '
                            'index lists (truncated?)')
  assert message.endswith('run the same `moetrain data prepare` command again, which redoes '
                          'only the damaged shards.')
  train_1.unlink()
  assert error_of(train_cfg).startswith(f'{train_1} is missing; run the same `moetrain data '
                                        'prepare` command again')
  prepare.prepare(cfg, out, progress=False, log=lambda *a: None)
  assert train_1.read_bytes() == data
  np.testing.assert_array_equal(next(data_lib.make_data(train_cfg, 0, 1).train)['inputs'],
                                good['inputs'])


def error_of(cfg) -> str:
  with pytest.raises(ConfigError) as e:
    data_lib.make_data(cfg, 0, 1)
  return str(e.value)


def test_opening_reads_no_token(corpus, monkeypatch):
  monkeypatch.setattr(np, 'fromfile', lambda *a, **k: pytest.fail('read a token file'))
  fingerprint = json.loads((corpus[2] / 'index.json').read_text())['tokenizer']
  opened = data_lib.open_prepared(corpus[2], fingerprint, 'data.paths')
  assert len(opened.train) > 0 and len(opened.eval) > 0


def test_errors_name_the_file_and_the_fix(corpus, tmp_path, tiny):
  root, jsonl, out = corpus
  copy = tmp_path / 'copy'
  copy.mkdir()
  for path in out.iterdir():
    (copy / path.name).write_bytes(path.read_bytes())
  bpe = tmp_path / 'bpe.json'
  data_lib.train_tokenizer(files_config(tiny, jsonl), 300, str(bpe))
  message = error_of(prepared_config(tiny, copy, **{'data.tokenizer': str(bpe)}))
  assert message.startswith(f"{copy / 'index.json'} was prepared with data.tokenizer='byte'")
  assert f"not data.tokenizer='{bpe}' (sha256 " in message
  assert message.endswith('set data.tokenizer to the one it was prepared with, or prepare the '
                          'source again with this one.')
  index = json.loads((copy / 'index.json').read_text())
  (copy / 'index.json').write_text(json.dumps(dict(index, version=0)))
  message = error_of(prepared_config(tiny, copy))
  assert message.startswith(f"{copy / 'index.json'} is an index of format 'moetrain-tokens' "
                            'version 0, and this moetrain reads')
  assert message.endswith('prepare the source again into a new directory with `moetrain '
                          'data prepare --output=NEW_DIR`.')
  (copy / 'index.json').unlink()
  assert error_of(prepared_config(tiny, copy)).startswith(
      f"{copy / 'index.json'} does not exist because its preparation did not finish; run "
      'the same `moetrain data prepare` command again')
  message = error_of(prepared_config(tiny, tmp_path / 'nowhere'))
  assert message.startswith(f"data.paths='{tmp_path / 'nowhere'}' is not a directory")


def test_prepare_leaves_other_data_alone(corpus, tmp_path, tiny):
  root, jsonl, out = corpus
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('keep me')
  cfg = files_config(tiny, jsonl, **{'data.shard_mb': SHARD_MB})
  with pytest.raises(ConfigError, match='is not a directory prepared by moetrain; choose a'):
    prepare.prepare(cfg, foreign, progress=False)
  assert [p.name for p in foreign.iterdir()] == ['notes.txt']
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  with pytest.raises(ConfigError, match='already holds tokens prepared with another split'):
    prepare.prepare(files_config(tiny, jsonl, **{'data.shard_mb': SHARD_MB, 'seed': 9}), out,
                    progress=False)
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_data_prepare_command_errors(tmp_path, capsys):
  cli.flags.FLAGS.unparse_flags()  # absl keeps --output from an earlier in-process call.
  with pytest.raises(SystemExit):
    cli.main(['moetrain', 'data', 'prepare', '--config=configs/tiny.py'])
  assert 'data prepare needs --output=DIR' in capsys.readouterr().err
  config = config_file(tmp_path / 'c.py', source='prepared', paths=str(tmp_path))
  with pytest.raises(SystemExit):
    cli.main(['moetrain', 'data', 'prepare', f'--config={config}',
              f'--output={tmp_path / "x"}'])
  assert "data.source='prepared' is already tokens" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(['moetrain', 'data', 'tokenize'])
  assert 'usage: moetrain data prepare' in capsys.readouterr().err


def test_errors_come_before_anything_compiles(corpus, tmp_path, tiny, monkeypatch, capsys):
  root, jsonl, out = corpus
  copy = tmp_path / 'copy'
  copy.mkdir()
  for path in out.iterdir():
    (copy / path.name).write_bytes(path.read_bytes())
  shard_files(copy, 0)[0].write_bytes(b'')
  compiled = []
  monkeypatch.setattr(step_lib, 'make_train_step', lambda *a: compiled.append(a))
  config = config_file(tmp_path / 'c.py', source='prepared', paths=str(copy), batch_size=8)
  with pytest.raises(SystemExit) as e:
    cli.main(['moetrain', 'train', f'--workdir={tmp_path / "w"}', f'--config={config}'])
  assert e.value.code == 2 and not compiled
  assert f'moetrain: {shard_files(copy, 0)[0]} holds 0 bytes' in capsys.readouterr().err


# ----------------------------------------------------------------------------- mixtures


@pytest.fixture(scope='module')
def two_dirs(tmp_path_factory, corpus):
  """Two prepared directories told apart by their bytes: lowercase text, and digits."""
  root = tmp_path_factory.mktemp('mixture')
  rng = np.random.default_rng(24)
  digits = [' '.join(str(x) for x in rng.integers(0, 10**6, rng.integers(5, 60)))
            for _ in range(80)]
  jsonl = write_jsonl(root / 'digits.jsonl', digits)
  cfg = files_config(tiny_config, jsonl, **{'data.shard_mb': SHARD_MB,
                                            'data.prepare_workers': 1})
  prepare.prepare(cfg, root / 'digits', progress=False, log=lambda *a: None)
  return corpus[2], root / 'digits'


def mixture_config(tiny, two_dirs, **overrides):
  words, digits = two_dirs
  return tiny(**{'data.source': 'prepared', 'data.mixture': f'w={words}:0.3,d={digits}:0.7',
                 'data.seq_len': 16, 'data.batch_size': 4, 'data.eval_fraction': 0.2,
                 'train.eval_batches': 4, **overrides})


def component_of(row) -> str:
  """'d' for a row of digits and spaces, 'w' for one of letters."""
  text = bytes(t for t in row if t < 256).decode('utf-8', 'replace')
  kinds = {'d' if c.isdigit() else 'w' for c in text if not c.isspace()}
  assert len(kinds) == 1, text
  return kinds.pop()


def test_mixture_follows_the_weights_and_counts_tokens(tiny, two_dirs):
  data = data_lib.make_data(mixture_config(tiny, two_dirs), 0, 1)
  seen = {'w': 0, 'd': 0}
  for _ in range(1000):
    for row in batch_rows(next(data.train)):
      seen[component_of(row)] += 1
  assert abs(seen['w'] / 4000 - 0.3) < 0.02 and abs(seen['d'] / 4000 - 0.7) < 0.02
  state = data.train.state()
  assert state == {'step': 1000, 'batch_size': 4,
                   'tokens_seen': {'w': seen['w'] * 16, 'd': seen['d'] * 16}}
  assert data_lib.state_metrics(state) == {'data/mixture/w/tokens_seen': seen['w'] * 16,
                                           'data/mixture/d/tokens_seen': seen['d'] * 16}
  eval_kinds = [component_of(row) for b in data.eval_batches for row in batch_rows(b)]
  assert eval_kinds.count('w') in (4, 5, 6) and len(eval_kinds) == 16
  assert 'in a mixture of w 0.3, d 0.7' in data.description
  data.train.close()


@pytest.mark.parametrize('processes', [2, 4])
def test_mixture_slices_and_resume(tiny, two_dirs, processes):
  cfg = mixture_config(tiny, two_dirs, **{'data.document_mask': True})
  whole = data_lib.make_data(cfg, 0, 1)
  reference = [next(whole.train) for _ in range(40)]
  parts = [data_lib.make_data(cfg, p, processes) for p in range(processes)]
  for part in parts:
    part.train.restore(json.loads(json.dumps(dict(step=25, batch_size=4))))
  for expected in reference[25:]:
    slices = [next(part.train) for part in parts]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), expected[key])
  counts = mixture.counts(40 * 4, [0.3, 0.7], cfg.seed)
  assert parts[0].train.state()['tokens_seen'] == {'w': int(counts[0]) * 16,
                                                   'd': int(counts[1]) * 16}
  for data in [whole, *parts]:
    data.train.close()


def test_training_logs_each_components_tokens_seen(tiny, two_dirs, tmp_path):
  cfg = mixture_config(tiny, two_dirs, **{'train.steps': 4, 'train.log_every': 2,
                                          'train.eval_every': 4, 'data.batch_size': 8,
                                          'train.eval_batches': 1})
  lines = []
  train_lib.train(cfg, tmp_path / 'run', log=lines.append)
  assert 'in a mixture of w 0.3, d 0.7' in lines[0]
  records = [r for r in metrics_lib.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
             if 'loss' in r]
  assert [r['step'] for r in records] == [2, 4]
  for r in records:
    counts = mixture.counts(r['step'] * 8, [0.3, 0.7], cfg.seed)
    assert r['data/mixture/w/tokens_seen'] == counts[0] * 16
    assert r['data/mixture/d/tokens_seen'] == counts[1] * 16
