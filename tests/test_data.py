"""Data pipeline: sources, tokenizers, packing, segment ids, split, row streams, resume,
process slices and shards, bad inputs; each checked against a plain Python reference."""

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

WORDS = ('the expert router sends each token to two of eight experts while a shared '
         'attention layer mixes tokens within a document and the loss counts every '
         'prediction café naïve').split()


def make_texts(num_docs: int, seed: int = 0, max_words: int = 60) -> list[str]:
  """num_docs pseudo-English documents of 5..max_words words (some non-ASCII)."""
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, rng.integers(5, max_words))) for _ in range(num_docs)]


def write_jsonl(path, texts, field='text'):
  path.write_text(''.join(json.dumps({field: t, 'id': i}) + '\n' for i, t in enumerate(texts)))
  return path


def files_config(tiny, paths, **overrides):
  """A tiny config reading local files."""
  return tiny(**{'data.source': 'files', 'data.paths': str(paths), 'data.max_documents': 0,
                 'data.seq_len': 16, 'data.batch_size': 4, 'data.eval_fraction': 0.2,
                 'train.eval_batches': 2, **overrides})


def packed_reference(token_lists, eod_id, seq_len):
  """Python loop: one stream of tokens with eod after each document, cut into rows."""
  stream = []
  for tokens in token_lists:
    stream += [int(t) for t in tokens] + [eod_id]
  width = seq_len + 1
  return [stream[i:i + width] for i in range(0, len(stream) - width + 1, width)]


def stream_reference(token_lists, num_streams, seed, seq_len, eod_id, steps):
  """Python loop of the row-stream design: deal the documents round-robin to the streams,
  pack each stream, visit stream j's rows in the order permutation(seed, j, epoch).
  Returns (the global batch rows of each step, each stream's rows)."""
  streams = [[] for _ in range(num_streams)]
  for k, tokens in enumerate(token_lists):
    streams[k % num_streams].append(tokens)
  rows = [packed_reference(docs, eod_id, seq_len) for docs in streams]
  batches = []
  for t in range(steps):
    batch = []
    for j in range(num_streams):
      n = len(rows[j])
      order = np.random.default_rng([seed, j, t // n]).permutation(n)
      batch.append(rows[j][order[t % n]])
    batches.append(batch)
  return batches, rows


def batch_rows(batch):
  """A batch dict -> its rows as lists (inputs + the last target)."""
  return [i.tolist() + [int(t[-1])] for i, t in zip(batch['inputs'], batch['targets'])]


def segments_reference(row, eod_id):
  """Python loop: (segment ids, positions) of one input row."""
  seg, pos, ids, positions = 1, 0, [], []
  for j, token in enumerate(row):
    if j > 0 and row[j - 1] == eod_id:
      seg, pos = seg + 1, 0
    ids.append(seg)
    positions.append(pos)
    pos += 1
  return ids, positions


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
  train_a, eval_a = data_lib.split_documents(50, 0.2, seed=4)
  train_b, eval_b = data_lib.split_documents(50, 0.2, seed=4)
  train_c, eval_c = data_lib.split_documents(50, 0.2, seed=5)
  np.testing.assert_array_equal(train_a, train_b)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.array_equal(eval_a, eval_c)
  assert len(eval_a) == 10
  assert sorted(np.concatenate([train_a, eval_a]).tolist()) == list(range(50))


def small_streams(num_streams=4, seed=6):
  """Row streams of 3, 5, 2, ... rows of 5 tokens (distinct values) and their ids."""
  sizes = [3, 5, 2, 4, 6, 1, 3, 2][:num_streams]
  starts = np.cumsum([0] + sizes)
  return [np.arange(starts[j] * 5, starts[j + 1] * 5, dtype=np.int32).reshape(-1, 5)
          for j in range(num_streams)]


def test_batches_follow_the_seeded_stream_permutations():
  rows = small_streams()
  batches = data_lib.Batches(rows, range(4), 4, seed=6)
  for t in range(12):  # every stream wraps at least twice.
    expected = []
    for j, rows_NR in enumerate(rows):
      n = len(rows_NR)
      expected.append(rows_NR[np.random.default_rng([6, j, t // n]).permutation(n)[t % n]])
    np.testing.assert_array_equal(next(batches)['inputs'], np.stack(expected)[:, :-1])
  assert batches.state() == {'step': 12, 'streams': 4}


@pytest.mark.parametrize('prefetch', [0, 3])
def test_resume_sees_the_batches_of_the_uninterrupted_run(tmp_path, tiny, prefetch):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(40, seed=17)),
                     **{'data.prefetch': prefetch, 'data.seq_len': 64,
                        'data.batch_size': 8, 'data.document_mask': True})
  uninterrupted = data_lib.make_data(cfg, 0, 1).train
  reference = [next(uninterrupted) for _ in range(40)]
  sizes = [len(r) for r in uninterrupted.source.stream_rows]
  assert min(sizes) < 13 and max(sizes) < 40  # streams wrap before and after the resume.
  first = data_lib.make_data(cfg, 0, 1).train
  for _ in range(13):
    next(first)
  saved = json.loads(json.dumps(first.state()))
  assert saved == {'step': 13, 'streams': 8}
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


def test_restore_rejects_another_stream_layout():
  batches = data_lib.Batches(small_streams(), range(4), 4, seed=0)
  for state in ({'step': 3, 'streams': 8}, {'epoch': 1, 'index': 8, 'num_rows': 40}):
    with pytest.raises(ConfigError, match=r'data\.batch_size=4 row streams'):
      batches.restore(state)


def test_prefetch_state_counts_only_batches_handed_out():
  rows = small_streams()
  prefetched = data_lib.Prefetch(data_lib.Batches(rows, range(4), 4, seed=0), depth=4)
  plain = data_lib.Batches(rows, range(4), 4, seed=0)
  for _ in range(3):
    np.testing.assert_array_equal(next(prefetched)['inputs'], next(plain)['inputs'])
  assert prefetched.state() == plain.state() == {'step': 3, 'streams': 4}
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
  assert sum(part.num_train_tokens for part in parts) == whole.num_train_tokens
  for data in [whole, *parts]:
    data.train.close()
  return whole


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(tiny, processes):
  assert_slices_make_the_global_batches(
      tiny(**{'data.max_documents': 30, 'data.document_mask': True}), processes, steps=5)


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_process_slices_match_across_epoch_boundaries(tmp_path, tiny, processes):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(40, seed=18)),
                     **{'data.seq_len': 64, 'data.batch_size': 8, 'data.document_mask': True})
  whole = assert_slices_make_the_global_batches(cfg, processes, steps=30)
  assert max(len(r) for r in whole.train.source.stream_rows) < 30  # every stream wraps.


def record_encoded(monkeypatch) -> list[str]:
  """Makes the byte tokenizer record every text it encodes; returns the record."""
  seen, encode_batch = [], data_lib.ByteTokenizer.encode_batch

  def recording(self, texts):
    seen.extend(texts)
    return encode_batch(self, texts)

  monkeypatch.setattr(data_lib.ByteTokenizer, 'encode_batch', recording)
  return seen


def test_each_process_tokenizes_only_its_streams_documents(tmp_path, tiny, monkeypatch):
  texts = [f'document {i}: ' + t for i, t in enumerate(make_texts(40, seed=19))]
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', texts),
                     **{'data.seq_len': 16, 'data.batch_size': 4})
  train_idx, eval_idx = data_lib.split_documents(40, 0.2, cfg.seed)
  seen = record_encoded(monkeypatch)
  touched = []
  for p in range(2):
    seen.clear()
    data_lib.make_data(cfg, p, 2).train.close()
    touched.append({texts.index(t) for t in seen} - set(eval_idx.tolist()))
    shard = set(train_idx[p * 2::4].tolist()) | set(train_idx[p * 2 + 1::4].tolist())
    assert touched[p] == shard  # streams 2p, 2p + 1 of 4.
  assert not touched[0] & touched[1]
  assert touched[0] | touched[1] == set(train_idx.tolist())


def test_each_process_reads_only_its_streams_stdlib_files(tiny, monkeypatch):
  cfg = tiny(**{'data.max_documents': 24, 'data.batch_size': 4})
  paths = data_lib.stdlib_paths(24)
  train_idx, eval_idx = data_lib.split_documents(24, cfg.data.eval_fraction, cfg.seed)
  read, read_text_file = [], data_lib.read_text_file
  monkeypatch.setattr(data_lib, 'read_text_file', lambda p: read.append(p) or read_text_file(p))
  shards = []
  for p in range(2):
    read.clear()
    data_lib.make_data(cfg, p, 2).train.close()
    shard = sorted(train_idx[p * 2::4].tolist() + train_idx[p * 2 + 1::4].tolist())
    assert sorted(read) == sorted([paths[i] for i in shard + eval_idx.tolist()])
    shards.append(set(shard))
  assert not shards[0] & shards[1]


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


def test_global_batches_follow_the_stream_reference(tmp_path, tiny):
  texts = make_texts(40, seed=10)
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', texts),
                     **{'data.prefetch': 0, 'data.seq_len': 64})
  data = data_lib.make_data(cfg, 0, 1)
  train_idx, _ = data_lib.split_documents(40, 0.2, cfg.seed)
  tokens = [list(t.encode()) for t in (texts[i] for i in train_idx)]
  expected, rows = stream_reference(tokens, 4, cfg.seed, 64, 256, steps=60)
  assert data.num_train_tokens == sum(len(r) for r in rows) * 64
  assert max(len(r) for r in rows) < 60  # the loop wraps every stream's epoch.
  for t, expected_rows in enumerate(expected):
    batch = next(data.train)
    assert batch['inputs'].shape == (4, 64)
    assert batch_rows(batch) == expected_rows, t


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
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', texts),
                     **{'data.tokenizer': path, 'data.document_mask': True})
  data = data_lib.make_data(cfg, 0, 1)
  tokenizer = data.tokenizer
  train_idx, _ = data_lib.split_documents(40, 0.2, cfg.seed)
  expected, rows = stream_reference([tokenizer.encode(texts[i]) for i in train_idx], 4,
                                    cfg.seed, 16, tokenizer.eod_id, steps=1)
  assert data.num_train_tokens == sum(len(r) for r in rows) * 16
  batch = next(data.train)
  assert batch_rows(batch) == expected[0]
  for b in range(4):
    ids, positions = segments_reference(batch['inputs'][b].tolist(), tokenizer.eod_id)
    assert batch['segment_ids'][b].tolist() == ids
    assert batch['positions'][b].tolist() == positions


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


def test_corpus_smaller_than_a_batch_names_the_key(tmp_path, tiny):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(10, max_words=8)),
                     **{'data.batch_size': 64})
  message = error_of(cfg)
  assert 'data.batch_size=64 row streams' in message and 'lower data.batch_size' in message


def test_streams_too_short_for_a_row_name_the_keys(tmp_path, tiny):
  cfg = files_config(tiny, write_jsonl(tmp_path / 'd.jsonl', make_texts(40, max_words=8)),
                     **{'data.seq_len': 512, 'data.batch_size': 4})
  message = error_of(cfg)
  assert message.startswith('training stream 0 of data.batch_size=4 packs into no row of '
                            'data.seq_len=512 tokens')
  assert 'lower data.batch_size or data.seq_len, or add documents' in message


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
         ({'data.prefetch': -1}, 'data.prefetch=-1 must be non-negative')]
  for overrides, start in bad:
    with pytest.raises(ConfigError, match='^' + start.replace('.', r'\.')):
      config_lib.validate(tiny(**overrides))


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


@pytest.mark.parametrize('flags,here,expect', [
    ([0, 1], False, 'process 1 found a training stream with no row'),
    ([1, 0], True, None),  # this process raises its own, more precise error.
    ([0, 0], False, None),
])
def test_agree_on_error_stops_every_process(monkeypatch, flags, here, expect):
  from jax.experimental import multihost_utils
  monkeypatch.setattr(multihost_utils, 'process_allgather',
                      lambda x: np.asarray(flags, np.int32))
  error = data_lib.agree_on_error(here)
  if expect is None:
    assert error is None
  else:
    assert isinstance(error, ConfigError) and expect in str(error)
