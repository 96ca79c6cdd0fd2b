"""Data pipeline: sources, tokenizers, packing, segment ids, the split, the batches of
prepared rows, resume, process slices, bad inputs; each checked against a plain Python
reference (tests/data_helpers.py)."""

import itertools
import json
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from moetrain import cli
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain.config import ConfigError
from moetrain.model.transformer import Transformer
from moetrain.parallel import mesh as mesh_lib

from data_helpers import (batch_rows, batches_reference, files_config, is_eval_reference,
                          make_texts, packed_reference, segments_reference, write_jsonl)

def train_bpe(tmp_path, vocab_size=300) -> str:
  """Trains a tiny byte-level BPE on a tiny corpus; returns the .json path."""
  corpus = write_jsonl(tmp_path / 'bpe_corpus.jsonl', make_texts(60, seed=7))
  cfg = config_lib.default_config()
  cfg.data.source, cfg.data.paths = 'files', str(corpus)
  out = tmp_path / 'tok' / 'bpe.json'
  data_lib.train_tokenizer(cfg, vocab_size, str(out))
  return str(out)


def test_pack_matches_python_loop():
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 50, rng.integers(0, 30)) for _ in range(20)]
  rows_NR = data_lib.pack(docs, 99, seq_len=7)
  assert rows_NR.dtype == np.int32
  assert rows_NR.tolist() == packed_reference(docs, 99, 7)


def test_segment_ids_and_positions_match_loop():
  rng = np.random.default_rng(2)
  eod = 9
  inputs_BL = rng.integers(0, 10, (6, 25)).astype(np.int32)  # eod about every 10 tokens.
  seg_BL = data_lib.segment_ids(inputs_BL, eod)
  pos_BL = data_lib.document_positions(inputs_BL, eod)
  assert seg_BL.dtype == np.int32 and pos_BL.dtype == np.int32
  for b in range(6):
    ids, positions = segments_reference(inputs_BL[b].tolist(), eod)
    assert seg_BL[b].tolist() == ids
    assert pos_BL[b].tolist() == positions


def test_document_mask_adds_segments_and_keeps_tokens():
  rows = data_lib.pack([np.arange(5), np.arange(3), np.arange(9)], eod_id=20, seq_len=8)
  plain = data_lib.to_batch(rows)
  masked = data_lib.to_batch(rows, eod_id=20, document_mask=True)
  assert set(plain) == {'inputs', 'targets', 'mask'}
  assert set(masked) == {'inputs', 'targets', 'mask', 'segment_ids', 'positions'}
  for key in plain:
    np.testing.assert_array_equal(plain[key], masked[key])
  assert masked['mask'].dtype == np.float32 and masked['mask'].shape == (2, 8)
  # Row 0: [0 1 2 3 4 eod 0 1 | 2]: document 1 is 0..4 + eod, document 2 starts at 6.
  assert masked['segment_ids'][0].tolist() == [1, 1, 1, 1, 1, 1, 2, 2]
  assert masked['positions'][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def test_packed_documents_equal_separate_documents_in_the_model(tiny):
  """With segment ids and restarted positions, a packed row gives each document the logits
  it gets alone (dense model: no capacity coupling between tokens)."""
  cfg = tiny(**{'model.num_experts': 0, 'model.vocab_size': 384})
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  doc_a, doc_b = rng.integers(0, 256, 6), rng.integers(0, 256, 9)
  rows = data_lib.pack([doc_a, doc_b], eod_id=256, seq_len=16)
  batch = data_lib.to_batch(rows, eod_id=256, document_mask=True)
  packed_BLV, _ = model(batch['inputs'], positions_BL=batch['positions'],
                        segment_ids_BL=batch['segment_ids'])
  alone_BLV, _ = model(np.append(doc_b, 256)[None].astype(np.int32))
  np.testing.assert_allclose(packed_BLV[0, 7:], alone_BLV[0, :9], atol=1e-5)


def test_split_is_a_function_of_the_seed():
  train_a, eval_a = data_lib.split_documents(500, 0.2, seed=4)
  train_b, eval_b = data_lib.split_documents(500, 0.2, seed=4)
  train_c, eval_c = data_lib.split_documents(500, 0.2, seed=5)
  np.testing.assert_array_equal(train_a, train_b)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.array_equal(eval_a, eval_c)
  assert eval_a.tolist() == [k for k in range(500) if is_eval_reference(k, 0.2, 4)]
  assert 70 <= len(eval_a) <= 130  # 100 expected, binomial sd 9.
  assert sorted(np.concatenate([train_a, eval_a]).tolist()) == list(range(500))
  with pytest.raises(ConfigError, match='leaves no training documents'):
    data_lib.split_documents(3, 0.999999, seed=0)


def direct_config(tmp_path, tiny, texts, **overrides):
  """A tiny config reading `texts` from a jsonl file (tokenized into the cache)."""
  return files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', texts), **overrides)


def test_batches_follow_the_python_reference(tmp_path, tiny):
  texts = make_texts(40, seed=10)
  cfg = direct_config(tmp_path, tiny, texts, **{'data.prefetch': 0, 'data.seq_len': 64})
  data = data_lib.make_data(cfg, 0, 1)
  tokens = [list(t.encode()) for t in texts]
  expected, rows = batches_reference(tokens, cfg.seed, 0.2, 64, 4, steps=60, eod_id=256)
  assert data.num_train_tokens == len(rows) * 64
  assert len(rows) < 60 * 4 // 2  # the loop wraps the rows' epoch at least twice.
  for t, expected_rows in enumerate(expected):
    batch = next(data.train)
    assert batch['inputs'].shape == (4, 64)
    assert batch_rows(batch) == expected_rows, t
  assert data.train.state() == {'step': 60, 'batch_size': 4}


@pytest.mark.parametrize('prefetch', [0, 3])
def test_resume_sees_the_batches_of_the_uninterrupted_run(tmp_path, tiny, prefetch):
  cfg = direct_config(tmp_path, tiny, make_texts(40, seed=17),
                      **{'data.prefetch': prefetch, 'data.seq_len': 64, 'data.batch_size': 8,
                         'data.document_mask': True})
  uninterrupted = data_lib.make_data(cfg, 0, 1).train
  reference = [next(uninterrupted) for _ in range(40)]
  rows = uninterrupted.source.num_rows[0]
  assert rows < 13 * 8 < 40 * 8 - rows  # epochs end before and after the resume.
  first = data_lib.make_data(cfg, 0, 1).train
  for _ in range(13):
    next(first)
  saved = json.loads(json.dumps(first.state()))
  assert saved == {'step': 13, 'batch_size': 8}
  first.close()
  resumed = data_lib.make_data(cfg, 0, 1).train
  resumed.restore(saved)
  for expected in reference[13:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  assert resumed.state()['step'] == 40
  for iterator in (uninterrupted, resumed):
    iterator.close()


def test_restore_rejects_another_layout(tmp_path, tiny):
  train = data_lib.make_data(direct_config(tmp_path, tiny, make_texts(40)), 0, 1).train
  for state in ({'step': 3, 'batch_size': 8}, {'step': 3, 'streams': 4}):
    with pytest.raises(ConfigError, match=r'data layout with data\.batch_size=4'):
      train.restore(state)
  train.close()


def test_prefetch_state_counts_only_batches_handed_out(tmp_path, tiny):
  cfg = direct_config(tmp_path, tiny, make_texts(40), **{'data.prefetch': 4})
  prefetched = data_lib.make_data(cfg, 0, 1).train
  plain = data_lib.make_data(cfg, 0, 1).train.source
  for _ in range(3):
    np.testing.assert_array_equal(next(prefetched)['inputs'], next(plain)['inputs'])
  assert prefetched.state() == plain.state() == {'step': 3, 'batch_size': 4}
  prefetched.close()


def assert_slices_make_the_global_batches(cfg, processes, steps):
  """The processes' slices concatenate to the 1-process batches, train and eval."""
  whole = data_lib.make_data(cfg, 0, 1)
  parts = [data_lib.make_data(cfg, p, processes) for p in range(processes)]
  for _ in range(steps):
    expected = next(whole.train)
    slices = [next(part.train) for part in parts]
    for key in expected:
      assert slices[0][key].shape[0] == cfg.data.batch_size // processes
      np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), expected[key])
  for i, expected in enumerate(whole.eval_batches):
    for key in expected:
      np.testing.assert_array_equal(
          np.concatenate([part.eval_batches[i][key] for part in parts]), expected[key])
  assert {part.eval_unigram_entropy for part in parts} == {whole.eval_unigram_entropy}
  assert {part.num_train_tokens for part in parts} == {whole.num_train_tokens}
  for data in [whole, *parts]:
    data.train.close()
  return whole


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(tiny, processes):
  assert_slices_make_the_global_batches(
      tiny(**{'data.max_documents': 30, 'data.document_mask': True}), processes, steps=5)


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_process_slices_match_across_epoch_boundaries(tmp_path, tiny, processes):
  cfg = direct_config(tmp_path, tiny, make_texts(40, seed=18),
                      **{'data.seq_len': 64, 'data.batch_size': 8, 'data.document_mask': True})
  whole = assert_slices_make_the_global_batches(cfg, processes, steps=30)
  assert whole.train.source.num_rows[0] < 30 * 8  # the rows' epoch wraps.


def test_each_process_reads_only_its_rows(tmp_path, tiny, monkeypatch):
  """Process p of 2 reads exactly the rows of its half of each batch from the token files."""
  cfg = direct_config(tmp_path, tiny, make_texts(40, seed=19), **{'data.prefetch': 0})
  whole = [batch_rows(b) for b in itertools.islice(data_lib.make_data(cfg, 0, 1).train, 6)]
  reads, read = [], data_lib.TokenFiles.read
  monkeypatch.setattr(data_lib.TokenFiles, 'read',
                      lambda self, start, stop: reads.append(read(self, start, stop)) or reads[-1])
  for p in range(2):
    train = data_lib.make_data(cfg, p, 2).train
    reads.clear()
    for _ in range(6):
      next(train)
    assert [r.tolist() for r in reads] == [row for rows in whole for row in rows[2 * p:2 * p + 2]]


def test_text_sources_are_tokenized_once(tiny, monkeypatch):
  """The second run of a stdlib config reads no source file: it trains from the cache."""
  cfg = tiny(**{'data.max_documents': 24, 'data.batch_size': 4})
  first = data_lib.make_data(cfg, 0, 1)
  read, read_text_file = [], data_lib.sources.read_text_file
  monkeypatch.setattr(data_lib.sources, 'read_text_file',
                      lambda p: read.append(p) or read_text_file(p))
  second = data_lib.make_data(cfg, 0, 1)
  assert not read
  for _ in range(3):
    np.testing.assert_array_equal(next(first.train)['inputs'], next(second.train)['inputs'])
  for data in (first, second):
    data.train.close()
  data_lib.make_data(tiny(**{'data.max_documents': 25, 'data.batch_size': 4}), 0, 1).train.close()
  assert len(read) == 25  # another source: tokenized into its own cache directory.


def test_to_global_equals_device_put(tiny):
  mesh = mesh_lib.make_mesh(tiny())
  sharding = mesh_lib.batch_sharding(mesh)
  batch = data_lib.to_batch(np.arange(8 * 5, dtype=np.int32).reshape(8, 5), 7, True)
  got = data_lib.to_global(batch, sharding)
  for key, value in batch.items():
    assert got[key].sharding == sharding and got[key].shape == value.shape
    np.testing.assert_array_equal(np.asarray(got[key]), value)


def test_text_json_and_parquet_files_give_the_same_documents(tmp_path, tiny):
  texts = make_texts(30, seed=8)
  (tmp_path / 'a.txt').write_text('\n'.join(texts[:15]) + '\n')
  (tmp_path / 'b.txt').write_text('\n\n'.join(texts[15:]) + '\n')  # blank lines are skipped.
  write_jsonl(tmp_path / 'docs.jsonl', texts, field='body')
  pq.write_table(pa.table({'body': texts, 'id': list(range(30))}), tmp_path / 'docs.parquet')
  text_cfg = files_config(tiny, f'{tmp_path}/b.txt,{tmp_path}/*.txt')  # b.txt once, first.
  assert data_lib.load_documents(text_cfg.data) == texts[15:] + texts[:15]
  for name in ('docs.jsonl', 'docs.parquet'):
    cfg = files_config(tiny, tmp_path / name, **{'data.text_field': 'body'})
    assert data_lib.load_documents(cfg.data) == texts
  cfg = files_config(tiny, tmp_path / 'docs.jsonl', **{'data.text_field': 'body',
                                                       'data.max_documents': 7})
  assert data_lib.load_documents(cfg.data) == texts[:7]


def test_text_files_sampled_by_document(tmp_path, tiny):
  texts = make_texts(4, seed=9)
  for i in range(2):
    (tmp_path / f'{i}.txt').write_text(texts[2 * i] + '\n' + texts[2 * i + 1] + '\n')
  cfg = files_config(tiny, tmp_path / '*.txt', **{'data.sample_by': 'document'})
  docs = data_lib.load_documents(cfg.data)
  assert [d.split() for d in docs] == [(texts[0] + ' ' + texts[1]).split(),
                                        (texts[2] + ' ' + texts[3]).split()]


def test_local_sources_switch_hf_offline(tmp_path, tiny, monkeypatch):
  import datasets
  monkeypatch.delenv('HF_DATASETS_OFFLINE')
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', False)
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(3)))
  data_lib.load_documents(cfg.data)
  assert os.environ['HF_DATASETS_OFFLINE'] == '1' and os.environ['HF_HUB_OFFLINE'] == '1'
  assert datasets.config.HF_HUB_OFFLINE


def test_trained_bpe_round_trips_and_sets_the_vocab(tmp_path, tiny):
  path = train_bpe(tmp_path, vocab_size=300)
  tokenizer = data_lib.make_tokenizer(tiny(**{'data.tokenizer': path}).data)
  assert tokenizer.vocab_size == 300
  assert tokenizer.eod_id == 0  # the special token comes first.
  text = make_texts(1, seed=11)[0] + ' ünïcode ✓ <|endoftext|>'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and tokenizer.eod_id not in ids.tolist()
  assert len(ids) < len(text.encode())  # merges were learned.
  assert tokenizer.decode(ids) == text
  assert [i.tolist() for i in tokenizer.encode_batch([text, 'a'])] == [
      ids.tolist(), tokenizer.encode('a').tolist()]
  cfg = data_lib.resolve_vocab(tiny(**{'data.tokenizer': path}))
  assert cfg.model.vocab_size == 384


def test_bpe_tokenizer_feeds_packed_rows(tmp_path, tiny):
  path = train_bpe(tmp_path, vocab_size=300)
  texts = make_texts(40, seed=12)
  cfg = direct_config(tmp_path, tiny, texts, **{'data.tokenizer': path,
                                                'data.document_mask': True})
  data = data_lib.make_data(cfg, 0, 1)
  tokenizer = data.tokenizer
  expected, rows = batches_reference([tokenizer.encode(t) for t in texts], cfg.seed, 0.2, 16,
                                     4, steps=1, eod_id=tokenizer.eod_id)
  assert data.num_train_tokens == len(rows) * 16
  batch = next(data.train)
  assert batch_rows(batch) == expected[0]
  for b in range(4):
    ids, positions = segments_reference(batch['inputs'][b].tolist(), tokenizer.eod_id)
    assert batch['segment_ids'][b].tolist() == ids
    assert batch['positions'][b].tolist() == positions
  data.train.close()


def test_sentencepiece_tokenizer(tmp_path, tiny):
  import sentencepiece
  corpus = tmp_path / 'sp.txt'
  corpus.write_text('\n'.join(make_texts(200, seed=13)) + '\n')
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'sp'), vocab_size=80,
      character_coverage=1.0, model_type='bpe', minloglevel=2)
  cfg = tiny(**{'data.tokenizer': str(tmp_path / 'sp.model')})
  tokenizer = data_lib.make_tokenizer(cfg.data)
  processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / 'sp.model'))
  assert (tokenizer.vocab_size, tokenizer.eod_id) == (80, processor.eos_id())
  text = make_texts(1, seed=14)[0]
  ids = tokenizer.encode(text)
  assert ids.tolist() == processor.encode(text) and tokenizer.eod_id not in ids.tolist()
  assert tokenizer.decode(ids) == text
  assert data_lib.resolve_vocab(cfg).model.vocab_size == 128


def test_tokenizer_train_command(tmp_path, capsys):
  corpus = write_jsonl(tmp_path / 'c.jsonl', make_texts(50, seed=15))
  config_file = tmp_path / 'cfg.py'
  config_file.write_text(
      'from moetrain.config import default_config\n\n\ndef get_config():\n'
      '  c = default_config()\n'
      f"  c.data.source, c.data.paths = 'files', {str(corpus)!r}\n"
      '  return c\n')
  out = tmp_path / 'bpe.json'
  cli.main(['moetrain', 'tokenizer', 'train', f'--config={config_file}', '--vocab_size=290',
            f'--output={out}'])
  assert 'wrote' in capsys.readouterr().out
  tokenizer = data_lib.HFTokenizer(str(out))
  assert tokenizer.vocab_size == 290 and tokenizer.eod_id == 0
  with pytest.raises(SystemExit):
    cli.main(['moetrain', 'tokenizer', 'train', f'--config={config_file}', '--vocab_size=100',
              f'--output={out}'])
  assert 'pass at least 257' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(['moetrain', 'tokenizer', 'fit'])
  assert 'usage: moetrain tokenizer train' in capsys.readouterr().err


def error_of(cfg) -> str:
  """The ConfigError message make_data raises for cfg."""
  with pytest.raises(ConfigError) as e:
    data_lib.make_data(cfg, 0, 1)
  return str(e.value)


def test_missing_path_names_the_key(tmp_path, tiny):
  message = error_of(files_config(tiny, tmp_path / 'nope' / '*.jsonl'))
  assert message.startswith('data.paths pattern') and 'matches no file' in message


def test_empty_file_names_the_key(tmp_path, tiny):
  (tmp_path / 'empty.txt').write_text('')
  message = error_of(files_config(tiny, tmp_path / 'empty.txt'))
  assert "data.source='files' gave no documents" in message and 'data.paths' in message


def test_jsonl_without_the_text_field_names_the_key(tmp_path, tiny):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(5), field='body'))
  message = error_of(cfg)
  assert message.startswith("data.text_field='text' is not a column")
  assert 'body' in message and 'set data.text_field' in message


@pytest.mark.parametrize('bad_line,message', [
    ('{"text": 12345}', r"^data\.text_field='text' holds int 12345 instead of text in row 6 "
                        r"of data\.paths=.*; fix that row or set data\.text_field"),
    ('{"text": ["a", "b"]}', r"holds list \['a', 'b'\] instead of text in row 6"),
    ('null', r'^.*d\.jsonl line 6 is not a JSON object \(.null.\); make every line'),
    ('"just a string"', r'd\.jsonl line 6 is not a JSON object'),
])
def test_a_jsonl_row_without_text_is_one_sentence_with_its_place(tmp_path, tiny, bad_line,
                                                                  message):
  """A row whose text is a number or a list, or a line that is no object (a bare null as
  the first line crashed HF datasets' reader with a segfault), names its place."""
  lines = [json.dumps({'text': t}) for t in make_texts(9, seed=19)]
  lines.insert(5, bad_line)
  (tmp_path / 'd.jsonl').write_text('\n'.join(lines) + '\n')
  assert re.search(message, error_of(files_config(tiny, tmp_path / 'd.jsonl')))


def test_null_text_rows_are_skipped_like_empty_ones(tmp_path, tiny):
  texts = make_texts(40, seed=20)
  lines = [json.dumps({'text': t}) for t in texts]
  lines.insert(7, json.dumps({'text': None}))
  (tmp_path / 'd.jsonl').write_text('\n'.join(lines) + '\n')
  assert data_lib.load_documents(files_config(tiny, tmp_path / 'd.jsonl').data) == texts


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, tiny, caplog):
  texts = make_texts(40, seed=16)
  lines = [t.encode() for t in texts]
  lines[3] = b'caf\xe9 \xff\xfe' + lines[3]  # three invalid bytes.
  (tmp_path / 'latin.txt').write_bytes(b'\n'.join(lines) + b'\n')
  jsonl = b''.join(b'{"text": "' + line + b'"}\n' for line in lines)
  (tmp_path / 'latin.jsonl').write_bytes(jsonl)
  for name in ('latin.txt', 'latin.jsonl'):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='moetrain.data'):
      docs = data_lib.load_documents(files_config(tiny, tmp_path / name).data)
    assert docs[3] == 'caf\ufffd \ufffd\ufffd' + texts[3] and docs[4] == texts[4]
    assert 'replaced 3 undecodable (non-UTF-8) bytes' in caplog.text


def test_eval_split_smaller_than_a_batch_names_the_keys(tmp_path, tiny):
  cfg = direct_config(tmp_path, tiny, make_texts(10, max_words=8), **{'data.batch_size': 64})
  message = error_of(cfg)
  assert message.startswith('the eval split of ')
  assert 'too few for one batch of data.batch_size=64' in message
  assert 'raise data.eval_fraction, lower data.batch_size or add documents' in message


def test_corpus_shorter_than_a_row_names_the_keys(tmp_path, tiny):
  cfg = direct_config(tmp_path, tiny, make_texts(40, max_words=8),
                      **{'data.seq_len': 2048, 'data.batch_size': 4})
  message = error_of(cfg)
  assert 'training tokens, less than one row of data.seq_len=2048 + 1' in message
  assert 'lower data.seq_len or add documents' in message


def test_bad_tokenizer_and_hub_offline_name_the_key(tmp_path, tiny):
  message = error_of(tiny(**{'data.tokenizer': str(tmp_path / 'missing.json')}))
  assert message.startswith('data.tokenizer=') and 'does not exist' in message
  assert "use 'byte'" in error_of(tiny(**{'data.tokenizer': 'gpt2'}))
  hub = tiny(**{'data.source': 'hub', 'data.hub_name': 'no-such/dataset-xyz'})
  message = error_of(hub)
  assert message.startswith("data.hub_name='no-such/dataset-xyz'")
  assert 'online' in message


def test_validate_checks_data_keys(tiny):
  bad = [({'data.source': 'web'}, "data.source='web' is not known"),
         ({'data.source': 'files'}, "data.source='files' needs data.paths"),
         ({'data.source': 'hub'}, "data.source='hub' needs data.hub_name"),
         ({'data.format': 'csv'}, "data.format='csv' is not known"),
         ({'data.prefetch': -1}, 'data.prefetch=-1 must be non-negative'),
         ({'data.shard_mb': 0}, 'data.shard_mb=0.0 must be positive'),
         ({'data.prepare_workers': -2}, 'data.prepare_workers=-2 must be a non-negative'),
         ({'data.source': 'prepared'}, "data.source='prepared' needs exactly one of"),
         ({'data.source': 'prepared', 'data.paths': 'a', 'data.mixture': 'b:1'},
          "data.source='prepared' needs exactly one of"),
         ({'data.mixture': 'a:1'}, "data.mixture needs data.source='prepared'"),
         ({'data.source': 'prepared', 'data.mixture': 'a:0.5,b'},
          "data.mixture entry 'b' is not DIR:WEIGHT"),
         ({'data.source': 'prepared', 'data.mixture': 'a:0.5,b:-1'},
          "data.mixture entry 'b:-1' is not DIR:WEIGHT with a positive weight"),
         ({'data.source': 'prepared', 'data.mixture': 'x/a:0.5,y/a:0.5'},
          "data.mixture names 'a' twice")]
  for overrides, start in bad:
    with pytest.raises(ConfigError, match='^' + start.replace('.', r'\.')):
      config_lib.validate(tiny(**overrides))
  assert config_lib.parse_mixture(' code=tok/c:3, tok/prose:1 ,') == [
      ('code', 'tok/c', 0.75), ('prose', 'tok/prose', 0.25)]


def test_real_processes_build_the_global_batch_from_their_slices():
  """2 local jax processes (2 CPU devices each): to_global of each process's slice gathers
  to the 1-process global batch."""
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  worker = os.path.join(os.path.dirname(__file__), 'data_multiprocess_worker.py')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, worker, str(port), '2', str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f'process {i} ok' in out, out[-2000:]
