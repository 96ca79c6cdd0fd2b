"""data.bpe_encoder='tiktoken': the same ids as HF tokenizers on fresh random texts, the same
prepared files, and one sentence for every tokenizer it cannot encode."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain.config import ConfigError
from moetrain.data import prepare
from moetrain.data.tiktoken_bpe import TiktokenBPE, byte_of_char

from data_helpers import files_config, make_texts, write_jsonl

PIECES = ['def', ' f(x):', '\n    ', 'return', " 'it's", '  ', '\t', '42', ' 3.14', 'héllo',
          ' 世界', '🙂', '<|endoftext|>', ' ', '\n\n', "we'll", 'x_1', '!!', ' naïve', '\r\n']


def random_texts(rng, count: int) -> list[str]:
  """Texts mixing words, code, digits, whitespace runs, contractions, non-ASCII and the
  end-of-document token written as text."""
  words = make_texts(count, seed=int(rng.integers(1 << 30)))
  return [''.join(rng.choice(PIECES, rng.integers(0, 30))) + w + rng.choice(PIECES)
          for w in words]


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  """(a 600-token byte-level BPE from `train_tokenizer`, its corpus)."""
  root = tmp_path_factory.mktemp('bpe')
  rng = np.random.default_rng(31)
  corpus = write_jsonl(root / 'corpus.jsonl', random_texts(rng, 300))
  cfg = config_lib.default_config()
  cfg.data.source, cfg.data.paths = 'files', str(corpus)
  path = root / 'bpe.json'
  data_lib.train_tokenizer(cfg, 600, str(path))
  return str(path), corpus


def hf_tokenizer(path: str):
  return data_lib.make_tokenizer(SimpleNamespace(tokenizer=path))


def test_tiktoken_gives_the_ids_of_hf_tokenizers(bpe, rng):
  path, _ = bpe
  hf = hf_tokenizer(path)
  fast = TiktokenBPE(hf, path)
  texts = random_texts(rng, 200)
  for got, text in zip(fast.encode_batch(texts), texts, strict=True):
    np.testing.assert_array_equal(got, hf.encode(text))
  assert fast.eod_id == hf.eod_id and fast.vocab_size == hf.vocab_size


def test_prepare_writes_the_same_files_with_either_encoder(bpe, tiny, tmp_path):
  path, corpus = bpe
  outs = {}
  for encoder in ('tokenizers', 'tiktoken'):
    cfg = files_config(tiny, corpus, **{'data.tokenizer': path, 'data.bpe_encoder': encoder,
                                        'data.shard_mb': 0.01, 'data.prepare_workers': 1})
    outs[encoder] = tmp_path / encoder
    prepare.prepare(cfg, outs[encoder], progress=False, log=lambda *a: None)
  names = sorted(p.name for p in outs['tokenizers'].iterdir())
  assert names == sorted(p.name for p in outs['tiktoken'].iterdir())
  assert sum(n.endswith('.bin') for n in names) > 4
  for name in names:
    assert (outs['tokenizers'] / name).read_bytes() == (outs['tiktoken'] / name).read_bytes()


def write_tokenizer(path, vocab: dict, merges: list, pre_tokenizer) -> str:
  """A HF tokenizers BPE file over the 256 byte-level characters plus `vocab`."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  full = byte_of_char()
  full.update({t: 256 + i for i, t in enumerate(vocab)})
  tokenizer = Tokenizer(models.BPE(full, merges))
  tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.save(str(path))
  return str(path)


def test_a_tokenizer_tiktoken_encodes_differently_is_one_sentence(tmp_path):
  """Merges out of id order: HF never merges (a, bc), tiktoken joins them into 'abc'."""
  path = write_tokenizer(tmp_path / 'odd.json', ['bc', 'ab', 'abc'],
                         [('b', 'c'), ('a', 'b'), ('ab', 'c')], None)
  fast = TiktokenBPE(hf_tokenizer(path), path)
  assert [list(ids) for ids in fast.encode_batch(['xy'])] == [[ord('x'), ord('y')]]
  with pytest.raises(ConfigError) as e:
    fast.encode_batch(['abc'])
  assert str(e.value) == (f"data.bpe_encoder='tiktoken' encodes 'abc' differently from "
                          f"tokenizers with data.tokenizer={path!r}; set "
                          "data.bpe_encoder='tokenizers'.")


def test_tokenizers_tiktoken_cannot_encode_are_refused_before_prepare(tmp_path, tiny):
  from tokenizers import pre_tokenizers
  path = write_tokenizer(tmp_path / 'ws.json', [], [], pre_tokenizers.Whitespace())
  corpus = write_jsonl(tmp_path / 'c.jsonl', make_texts(20, seed=3))
  cfg = files_config(tiny, corpus, **{'data.tokenizer': path, 'data.bpe_encoder': 'tiktoken'})
  with pytest.raises(ConfigError) as e:
    prepare.prepare(cfg, tmp_path / 'out', progress=False)
  assert str(e.value) == (f"data.bpe_encoder='tiktoken' cannot encode data.tokenizer={path!r}"
                          ' (its pre-tokenizer is not ByteLevel(add_prefix_space=False, '
                          "use_regex=True)); set data.bpe_encoder='tokenizers'.")
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('overrides,message', [
    ({'data.bpe_encoder': 'fast'}, "data.bpe_encoder='fast' is not known; use one of "
                                   'tokenizers, tiktoken.'),
    ({'data.bpe_encoder': 'tiktoken'}, "data.bpe_encoder='tiktoken' encodes HF tokenizers "
                                       ".json files, not data.tokenizer='byte'; set "
                                       "data.bpe_encoder='tokenizers'."),
])
def test_bad_bpe_encoder_values(tiny, overrides, message):
  with pytest.raises(ConfigError, match=f'^{re.escape(message)}$'):
    config_lib.validate(tiny(**overrides))
