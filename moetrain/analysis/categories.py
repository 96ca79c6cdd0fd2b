"""Token categories for specialization analyses, as pure functions of text and token ids.

Two schemes, each an int category per token (-1: no category, e.g. the end-of-document
token or a token that decodes to no bytes):
  python      the standard `tokenize` module's view of Python source, mapped onto the
              characters a token decodes to: keyword, name, number, string, comment,
              operator, indent/newline (line breaks and the leading whitespace of a
              line), whitespace (other blanks), other (what tokenize rejects).
  char class  the token's characters: letter, digit, space, punctuation (punctuation and
              symbols), other (control characters, U+FFFD for partial UTF-8).
A token holding characters of several categories takes the most frequent one (python:
among its UTF-8 bytes; char class: among its characters; ties: the first in the list).
"""

from __future__ import annotations

import keyword
import tokenize
import unicodedata

import numpy as np

PYTHON = ('keyword', 'name', 'number', 'string', 'comment', 'operator', 'indent/newline',
          'whitespace', 'other')
CHAR_CLASSES = ('letter', 'digit', 'space', 'punctuation', 'other')
_P = {name: i for i, name in enumerate(PYTHON)}
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, name) for name in
                                     ('FSTRING_START', 'FSTRING_MIDDLE', 'FSTRING_END')
                                     if hasattr(tokenize, name)}
_LAYOUT_TYPES = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT}
_UNSET = -1


def char_class(ch: str) -> int:
  """Index in CHAR_CLASSES of one character."""
  if ch.isalpha():
    return 0
  if ch.isdigit():
    return 1
  if ch.isspace():
    return 2
  if ch != '\ufffd' and unicodedata.category(ch)[0] in 'PS':
    return 3
  return 4


def _python_token_category(tok) -> int | None:
  """Category of one tokenize token; None leaves its characters to the blank rules."""
  if tok.type == tokenize.NAME:
    return _P['keyword'] if keyword.iskeyword(tok.string) else _P['name']
  if tok.type == tokenize.NUMBER:
    return _P['number']
  if tok.type in _STRING_TYPES:
    return _P['string']
  if tok.type == tokenize.COMMENT:
    return _P['comment']
  if tok.type == tokenize.OP:
    return _P['operator']
  if tok.type in _LAYOUT_TYPES:
    return _P['indent/newline']
  if tok.type == tokenize.ERRORTOKEN and not tok.string.isspace():
    return _P['other']
  return None


def python_char_categories(text: str) -> np.ndarray:
  """int [len(text)]: the PYTHON category of every character of `text`, tokenized as it
  stands. A text cut inside a multi-line string reads as a string to its end; after any
  other tokenize error the rest of the text is 'other' (blanks still count as blanks)."""
  lines = text.split('\n')
  lines = [line + '\n' for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
  starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(int)
  cats = np.full(len(text), _UNSET, np.int64)
  offset = lambda pos: starts[min(pos[0] - 1, len(lines))] + pos[1]
  reader = iter(lines)
  try:
    for tok in tokenize.generate_tokens(lambda: next(reader, '')):
      category = _python_token_category(tok)
      if category is not None:
        cats[offset(tok.start):offset(tok.end)] = category
  except (tokenize.TokenError, SyntaxError) as e:
    where = e.args[1] if isinstance(e, tokenize.TokenError) else (e.lineno or 1, 0)
    rest = cats[offset(where):]
    rest[rest == _UNSET] = _P['string'] if 'string' in str(e.args[0]) else _P['other']
  chars = np.array(list(text)) if text else np.zeros(0, str)
  blank = np.char.isspace(chars) if text else np.zeros(0, bool)
  newline = chars == '\n'
  line_start = np.zeros(len(text), bool)  # blanks between a line start and its first text
  for start, line in zip(starts, lines):
    lead = len(line) - len(line.lstrip(' \t\f'))
    line_start[start:start + lead] = True
  unset = cats == _UNSET
  cats[unset & blank] = _P['whitespace']
  cats[unset & blank & line_start] = _P['indent/newline']
  cats[unset & newline] = _P['indent/newline']
  cats[(cats == _UNSET)] = _P['other']
  return cats


def _majority(cats_bytes: np.ndarray, num_categories: int) -> int:
  return int(np.argmax(np.bincount(cats_bytes, minlength=num_categories)))


def token_categories_of_text(text: str, bytes_N: np.ndarray, char_cats: np.ndarray,
                             num_categories: int) -> np.ndarray:
  """Category per token of a text that decodes from N tokens holding bytes_N[i] UTF-8
  bytes each, given a category per character: int [N] (-1 for tokens of 0 bytes).

  Returns None when the byte counts do not add up to the text's UTF-8 length (a text cut
  inside a character, or a decoder that changes the text)."""
  widths = np.array([len(ch.encode('utf-8', 'surrogatepass')) for ch in text], np.int64)
  if int(widths.sum()) != int(np.sum(bytes_N)):
    return None
  cats_bytes = np.repeat(char_cats, widths)
  ends = np.cumsum(bytes_N)
  out = np.full(len(bytes_N), -1, np.int64)
  for i, (start, end) in enumerate(zip(ends - bytes_N, ends)):
    if end > start:
      out[i] = _majority(cats_bytes[start:end], num_categories)
  return out


def python_token_categories(ids_N: np.ndarray, decode, bytes_V: np.ndarray,
                            eod_id: int) -> np.ndarray:
  """PYTHON category of every token of a token stream ids_N (documents separated by
  `eod_id`), each document decoded by `decode` (ids -> text) and tokenized whole;
  bytes_V [V] is the UTF-8 bytes of each id inside a document
  (`moetrain.token_bytes`). int [N]; -1 for end-of-document tokens and tokens of 0 bytes,
  'other' for a document whose bytes do not line up with its text."""
  out = np.full(len(ids_N), -1, np.int64)
  bounds = np.flatnonzero(ids_N == eod_id)
  for start, end in zip(np.concatenate([[0], bounds + 1]), np.concatenate([bounds, [len(ids_N)]])):
    if end <= start:
      continue
    doc = ids_N[start:end]
    text = decode(doc)
    bytes_N = bytes_V[doc]
    cats = token_categories_of_text(text, bytes_N, python_char_categories(text), len(PYTHON))
    out[start:end] = np.where(bytes_N > 0, _P['other'], -1) if cats is None else cats
  return out


def char_class_table(decode, vocab_size: int, eod_id: int) -> np.ndarray:
  """int [V]: the CHAR_CLASSES index of each token id's text (decode([id])), the most
  frequent class among its characters (ties: the first); -1 for the end-of-document id
  and ids that decode to nothing."""
  table = np.full(vocab_size, -1, np.int64)
  for i in range(vocab_size):
    text = decode([i]) if i != eod_id else ''
    if text:
      table[i] = _majority(np.array([char_class(c) for c in text]), len(CHAR_CLASSES))
  return table
