"""Bytes per token, for bits per byte: a loss that does not depend on the tokenizer.

Bits per byte = total nats / (ln 2 * UTF-8 bytes the target tokens decode to). A token's
bytes can depend on where it stands: decoders drop the leading space of a document's first
token (sentencepiece's dummy prefix, HF `Metaspace`, `Strip`). So each tokenizer gives two
tables over the model's vocabulary: `mid_V`, the bytes a token adds inside a document, and
`first_V`, its bytes as the first token of a document. The end-of-document token, special
tokens and the ids past the tokenizer's vocabulary count 0 bytes.

In packed rows a target is a document's first token exactly when its input is the
end-of-document token (`target_bytes`): the stream's very first token, and a document
starting at a row boundary, sit at input position 0 and are never targets.

Per tokenizer:
  byte           1 byte per id below 256.
  HF tokenizers  byte-level decoders (GPT-2, Llama 3, Qwen, the BPE `moetrain tokenizer
                 train` writes): the bytes of the token's characters through the byte-level
                 alphabet; `<0xNN>` byte-fallback tokens: 1; other tokens: what the decoder
                 adds after an anchor token (`decode([a, t]) - decode([a])`).
  sentencepiece  byte pieces 1, control pieces 0, the unknown piece its surface (' ⁇ '),
                 other pieces their text with '▁' as a space.
`first_V` comes from decoding the token alone (except where alone it is a partial UTF-8
character, which decoders show as U+FFFD: then it equals `mid_V`).
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from moetrain import data as data_lib

REPLACEMENT = '\ufffd'
_BYTE_TOKEN = re.compile(r'<0x[0-9A-Fa-f]{2}>')


@dataclasses.dataclass(frozen=True)
class TokenBytes:
  """UTF-8 bytes of each token id: `mid_V` inside a document, `first_V` as its first token
  (int32 [V], V the model's vocabulary)."""
  mid_V: np.ndarray
  first_V: np.ndarray

  def table(self) -> np.ndarray:
    """int32 [2, V]: row 0 mid_V, row 1 first_V (what `target_bytes` takes)."""
    return np.stack([self.mid_V, self.first_V]).astype(np.int32)


def target_bytes(inputs_BL, targets_BL, table_2V, eod_id: int):
  """UTF-8 bytes each target token decodes to, [B, L] int32 (NumPy or jax arrays).

  A target whose input is the end-of-document token starts a document and takes its
  first-token bytes."""
  starts_BL = (inputs_BL == eod_id).astype(targets_BL.dtype)
  return table_2V[starts_BL, targets_BL]


def byte_level_alphabet() -> dict[str, int]:
  """The byte-level BPE alphabet (GPT-2's bytes_to_unicode): printable character -> byte.
  Bytes that print as themselves keep their character; the others map to 256 + n."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[chr(byte)] = byte
    else:
      chars[chr(256 + extra)] = byte
      extra += 1
  return chars


def byte_level_length(token: str, alphabet: dict[str, int]) -> int:
  """Bytes a byte-level decoder gives for `token`: one per character when all of them are
  in the alphabet, else the token's own UTF-8 bytes (what HF `tokenizers` does)."""
  if all(c in alphabet for c in token):
    return len(token)
  return len(token.encode('utf-8'))


def _decoder_types(decoder: dict | None) -> set[str]:
  """The decoder types of a HF tokenizer's `decoder` JSON, Sequences flattened."""
  if not decoder:
    return set()
  if decoder.get('type') == 'Sequence':
    return set().union(*(_decoder_types(d) for d in decoder.get('decoders', [])))
  return {decoder.get('type')}


def _utf8_len(text: str) -> int:
  return len(text.encode('utf-8'))


def _first_lengths(decoded_alone: list[str], tokens: list[str], mid: list[int]) -> list[int]:
  """A token's bytes as a document's first token: its decoding alone, unless alone it is a
  partial character (U+FFFD that the token does not hold): then its `mid` bytes."""
  return [m if REPLACEMENT in d and REPLACEMENT not in t else _utf8_len(d)
          for d, t, m in zip(decoded_alone, tokens, mid)]


def hf_token_bytes(tokenizer, vocab_size: int) -> TokenBytes:
  """Byte tables of a `moetrain.data.HFTokenizer` (see the module docstring)."""
  tok = tokenizer.tokenizer
  spec = json.loads(tok.to_str())
  kinds = _decoder_types(spec.get('decoder'))
  special = {t['id'] for t in spec.get('added_tokens', []) if t.get('special')}
  size = tok.get_vocab_size(with_added_tokens=True)
  ids = [i for i in range(size) if i not in special and i != tokenizer.eod_id]
  tokens = [tok.id_to_token(i) or '' for i in ids]
  alphabet = byte_level_alphabet()
  anchor = [int(i) for i in tokenizer.encode('a')[-1:]]
  anchor_len = _utf8_len(tok.decode(anchor)) if anchor else 0
  after_anchor = tok.decode_batch([anchor + [i] for i in ids], skip_special_tokens=True)
  mid = []
  for token, decoded in zip(tokens, after_anchor):
    if 'ByteFallback' in kinds and _BYTE_TOKEN.fullmatch(token):
      mid.append(1)
    elif 'ByteLevel' in kinds:
      mid.append(byte_level_length(token, alphabet))
    else:
      mid.append(_utf8_len(decoded) - anchor_len)
  alone = tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
  return _tables(vocab_size, ids, mid, _first_lengths(alone, tokens, mid))


def sentencepiece_token_bytes(tokenizer, vocab_size: int) -> TokenBytes:
  """Byte tables of a `moetrain.data.SentencePieceTokenizer` (see the module docstring)."""
  sp = tokenizer.processor
  ids = [i for i in range(sp.get_piece_size()) if not sp.is_control(i)]
  pieces = [sp.id_to_piece(i) for i in ids]
  alone = sp.decode([[i] for i in ids])
  mid = []
  for i, piece, decoded in zip(ids, pieces, alone):
    if sp.is_byte(i):
      mid.append(1)
    elif sp.is_unknown(i):
      mid.append(_utf8_len(decoded))
    else:
      mid.append(_utf8_len(piece.replace('\u2581', ' ')))
  return _tables(vocab_size, ids, mid, _first_lengths(alone, pieces, mid))


def _tables(vocab_size: int, ids: list[int], mid: list[int], first: list[int]) -> TokenBytes:
  mid_V, first_V = np.zeros(vocab_size, np.int32), np.zeros(vocab_size, np.int32)
  mid_V[ids], first_V[ids] = mid, first
  return TokenBytes(mid_V, first_V)


def token_bytes(tokenizer, vocab_size: int) -> TokenBytes:
  """Byte tables over a model vocabulary of `vocab_size` ids for a moetrain tokenizer
  (`moetrain.data.make_tokenizer`)."""
  if isinstance(tokenizer, data_lib.SentencePieceTokenizer):
    return sentencepiece_token_bytes(tokenizer, vocab_size)
  if isinstance(tokenizer, data_lib.HFTokenizer):
    return hf_token_bytes(tokenizer, vocab_size)
  mid_V = np.zeros(vocab_size, np.int32)
  mid_V[:256] = 1  # the byte tokenizer: ids 0..255 are bytes, 256 ends a document.
  return TokenBytes(mid_V, mid_V.copy())
