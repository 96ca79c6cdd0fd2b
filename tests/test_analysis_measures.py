"""The pure pieces of `moetrain analyze`: token categories and routing measures, against
loops and hand-checked text, on fresh random inputs."""

import collections
import math

import numpy as np
import pytest

from moetrain import data as data_lib
from moetrain.analysis import categories as cat
from moetrain.analysis import measures

P = {name: i for i, name in enumerate(cat.PYTHON)}


def loop_nmi(x, y):
  """NMI of two label lists by counting pairs, with the arithmetic normalization."""
  n = len(x)
  px, py, pxy = collections.Counter(x), collections.Counter(y), collections.Counter(zip(x, y))
  h = lambda c: -sum(v / n * math.log(v / n) for v in c.values())
  mi = sum(v / n * math.log((v / n) / (px[a] / n * py[b] / n)) for (a, b), v in pxy.items())
  return 0.0 if h(px) == 0 or h(py) == 0 else mi / ((h(px) + h(py)) / 2)


def test_contingency_and_nmi_match_loops(rng):
  n, k, e, c = 500, 2, 6, 4
  expert_NK = np.stack([rng.permutation(e)[:k] for _ in range(n)])
  category_N = rng.integers(-1, c, n)
  counts = measures.contingency(expert_NK, category_N, e, c)
  ref = np.zeros((e, c), int)
  pairs = []
  for t in range(n):
    for j in range(k):
      if category_N[t] >= 0:
        ref[expert_NK[t, j], category_N[t]] += 1
        pairs.append((expert_NK[t, j], category_N[t]))
  np.testing.assert_array_equal(counts, ref)
  assert measures.nmi(counts) == pytest.approx(loop_nmi(*zip(*pairs)), rel=1e-9)
  same = rng.integers(0, 3, 300)
  assert measures.nmi(measures.contingency(same[:, None], same, 3, 3)) == pytest.approx(1.0)
  assert measures.nmi(np.ones((3, 1))) == 0.0


def test_random_router_keeps_the_load_and_sees_no_structure(rng):
  n, e = 4000, 4
  category_N = rng.integers(0, 3, n)
  expert_N1 = ((category_N + (rng.random(n) < 0.1)) % e)[:, None]  # follows categories.
  assert measures.nmi(measures.contingency(expert_N1, category_N, e, 3)) > 0.5
  assert measures.random_router_nmi(expert_N1, category_N, e, 3, seed=1) < 0.01


def test_top_tokens_match_counter(rng):
  n, e = 400, 3
  ids_N = rng.integers(0, 20, n)
  expert_NK = np.stack([rng.permutation(e)[:2] for _ in range(n)])
  top = measures.top_tokens(expert_NK, ids_N, e, count=4)
  for expert in range(e):
    counter = collections.Counter(int(i) for i, row in zip(ids_N, expert_NK) if expert in row)
    ref = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    assert top[expert] == ref


def test_cross_layer_matches_the_best_mapping_loop(rng):
  n, e = 1000, 4
  a = rng.integers(0, e, n)
  b = np.where(rng.random(n) < 0.7, (a + 1) % e, rng.integers(0, e, n))
  out = measures.cross_layer(a, b, e)
  best = sum(max(np.sum((a == i) & (b == j)) for j in range(e)) for i in range(e)) / n
  chance = max(np.sum(b == j) for j in range(e)) / n
  assert out['accuracy'] == pytest.approx(best) and out['chance'] == pytest.approx(chance)
  assert out['accuracy'] > out['chance']
  assert out['nmi'] == pytest.approx(loop_nmi(a.tolist(), b.tolist()))


def test_python_categories_of_each_character():
  text = 'def f(x):\n    return x + 1  # one\n\ns = """doc\nstring"""\n'
  cats = cat.python_char_categories(text)
  at = lambda sub, k=0: cats[text.index(sub) + k]
  assert at('def') == P['keyword'] and at('f(') == P['name'] and at('(x') == P['operator']
  assert at('return') == P['keyword'] and at('1') == P['number'] and at('#') == P['comment']
  assert at('"""doc') == P['string'] and at('string') == P['string']
  assert at('    return') == P['indent/newline'] and at('\n') == P['indent/newline']
  assert at(' +') == P['whitespace'] and at('+') == P['operator']
  cut = 'x = """never closed\nstill in it'
  assert set(cat.python_char_categories(cut)[cut.index('"'):]) == {P['string']}
  assert len(cat.python_char_categories('')) == 0


def test_tokens_take_their_bytes_majority_category():
  text = 'é if x'  # 'é' is 2 UTF-8 bytes.
  chars = np.array([P['name'], P['whitespace'], P['keyword'], P['keyword'], P['whitespace'],
                    P['name']])
  bytes_N = np.array([3, 2, 1, 1, 0])  # 'é ', 'if', ' ', 'x', a 0-byte token.
  out = cat.token_categories_of_text(text, bytes_N, chars, len(cat.PYTHON))
  assert out.tolist() == [P['name'], P['keyword'], P['whitespace'], P['name'], -1]
  assert cat.token_categories_of_text(text, np.array([1]), chars, len(cat.PYTHON)) is None


def test_stream_categories_per_document_and_char_classes():
  tok = data_lib.ByteTokenizer()
  docs = ['import os\n', 'x = 1  # c\n']
  ids = np.concatenate([np.append(tok.encode(d), tok.eod_id) for d in docs])
  bytes_V = np.ones(257, int)
  bytes_V[tok.eod_id] = 0
  out = cat.python_token_categories(ids, tok.decode, bytes_V, tok.eod_id)
  ref = np.concatenate([np.append(cat.python_char_categories(d), -1) for d in docs])
  np.testing.assert_array_equal(out, ref)
  table = cat.char_class_table(tok.decode, 300, tok.eod_id)
  names = [cat.CHAR_CLASSES[table[ord(c)]] for c in 'a7 +\t']
  assert names == ['letter', 'digit', 'space', 'punctuation', 'space']
  assert cat.CHAR_CLASSES[table[200]] == 'other' and table[tok.eod_id] == -1
  assert table[299] == -1  # past the tokenizer's vocabulary: decodes to nothing.
