"""Bytes per token: for each tokenizer family, the bytes counted for a document's target
tokens equal the UTF-8 bytes of the document's decoded text, on real text (standard
library sources) and on non-ASCII text (multi-byte characters split over byte tokens,
documents that start with spaces)."""

import io

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from moetrain import data as data_lib
from moetrain import metrics as metrics_lib
from moetrain import token_bytes

from conftest import tiny_config

UNICODE = ['naïve café — 日本語 😀 ünïcödé', '  indented start', '\n\nblank lines first',
           ' x', '😀😀 ends with a space ', 'Ελληνικά και русский']


@pytest.fixture(scope='module')
def corpus():
  texts = [text for _, text in data_lib.stdlib_documents(12)]
  return texts, [line for t in texts for line in t.splitlines()] + UNICODE * 3


def llama_style(train_lines, path):
  """A sentencepiece-like HF tokenizer (Llama 2 / Mistral): '▁' for spaces, byte fallback,
  and a decoder that strips the leading space."""
  tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                         normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  specials = ['</s>'] + [f'<0x{i:02X}>' for i in range(256)]
  tok.train_from_iterator(train_lines, trainer=trainers.BpeTrainer(
      vocab_size=700, special_tokens=specials, show_progress=False))
  tok.save(str(path))
  return data_lib.HFTokenizer(str(path))


def metaspace(train_lines, path):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(train_lines, trainer=trainers.BpeTrainer(
      vocab_size=600, special_tokens=['</s>'], show_progress=False,
      initial_alphabet=sorted(set(''.join(UNICODE)))))
  tok.save(str(path))
  return data_lib.HFTokenizer(str(path))


def spm(train_lines, path, keep_spaces: bool):
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(train_lines), model_writer=model, vocab_size=500,
      byte_fallback=True, character_coverage=0.99, remove_extra_whitespaces=not keep_spaces,
      minloglevel=2)
  path.write_bytes(model.getvalue())
  return data_lib.SentencePieceTokenizer(str(path))


def make(kind, train_lines, tmp_path):
  if kind == 'byte':
    return data_lib.ByteTokenizer()
  if kind == 'byte_level_bpe':  # what `moetrain tokenizer train` writes.
    return data_lib.train_tokenizer(tiny_config(), 600, str(tmp_path / 'bpe.json'))
  if kind == 'llama_style':
    return llama_style(train_lines, tmp_path / 'llama.json')
  if kind == 'metaspace':
    return metaspace(train_lines, tmp_path / 'metaspace.json')
  return spm(train_lines, tmp_path / 'sp.model', keep_spaces=kind == 'sentencepiece_spaces')


@pytest.mark.parametrize('kind', ['byte', 'byte_level_bpe', 'llama_style', 'metaspace',
                                  'sentencepiece', 'sentencepiece_spaces'])
def test_document_bytes_equal_its_decoded_text(kind, corpus, tmp_path):
  """Each document as a row [eod, tokens..., eod]: the bytes of its targets (the first one
  after the eod input, the closing eod 0) equal len(decode(tokens).encode())."""
  texts, train_lines = corpus
  tok = make(kind, train_lines, tmp_path)
  vocab = data_lib.padded_vocab_size(tok.vocab_size)
  table = token_bytes.token_bytes(tok, vocab).table()
  assert table.shape == (2, vocab) and table[:, tok.eod_id].tolist() == [0, 0]
  assert not table[:, tok.vocab_size:].any()
  for text in texts + UNICODE:
    ids = tok.encode(text)
    row = np.concatenate([[tok.eod_id], ids, [tok.eod_id]]).astype(np.int32)
    got = token_bytes.target_bytes(row[None, :-1], row[None, 1:], table, tok.eod_id)
    assert int(got.sum()) == len(tok.decode(ids).encode('utf-8')), (kind, text[:40])


def test_packed_rows_count_each_document_start_once(corpus):
  """Byte tokens packed into rows: every target is a byte except the eod ones."""
  texts, _ = corpus
  tok = data_lib.ByteTokenizer()
  rows = data_lib.pack(tok.encode_batch(texts), tok.eod_id, 64)
  table = token_bytes.token_bytes(tok, 384).table()
  got = token_bytes.target_bytes(rows[:, :-1], rows[:, 1:], table, tok.eod_id)
  assert int(got.sum()) == int(np.sum(rows[:, 1:] != tok.eod_id))


def test_byte_level_alphabet_is_the_gpt2_byte_map():
  alphabet = token_bytes.byte_level_alphabet()
  assert sorted(alphabet.values()) == list(range(256))
  assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
  assert alphabet['Ġ'] == ord(' ') and alphabet['a'] == ord('a')
  assert token_bytes.byte_level_length('ĠcafÃ©', alphabet) == 6
  assert token_bytes.byte_level_length('<|endoftext|>', alphabet) == 13


def test_eval_totals():
  totals = metrics_lib.EvalTotals(nats=300.0, tokens=100.0, bytes=250.0)
  assert totals.loss == 3.0 and totals.perplexity == pytest.approx(np.exp(3.0))
  assert totals.bits_per_byte == pytest.approx(300 / (np.log(2) * 250))
  assert totals.scalars() == {'eval/loss': 3.0, 'eval/bits_per_byte': totals.bits_per_byte}
  assert np.isnan(metrics_lib.EvalTotals(1.0, 1.0, 0.0).bits_per_byte)
