"""Data: sources, tokenizers, prepared token files, mixtures, per-process batches, prefetch.

One concern per module:
  sources.py     the documents of stdlib / files / hub sources, in a fixed order
  tokenizers.py  byte, HF tokenizers and sentencepiece tokenizers; the model vocabulary
  packing.py     the split by document, rows of packed documents, segment ids, batch dicts
  shuffle.py     keyed hashes and O(1) permutations (split, row order, mixture offsets)
  prepare.py     tokenizing a source once into token shards + an index; the cache
  mixture.py     which prepared directory each row of a batch comes from
  loader.py      reading prepared rows, process slices, prefetch, global arrays, `make_data`

The names below are the package's public interface (`from moetrain import data`).
"""

from moetrain.data.loader import (Batches, Component, Data, Prefetch, Prepared, TokenFiles,
                                  make_data, open_prepared, process_slice, state_metrics,
                                  to_global)
from moetrain.data.packing import (document_positions, document_starts, is_eval_document,
                                   join_documents, pack, segment_ids, split_documents,
                                   to_batch, unigram_entropy)
from moetrain.data.prepare import prepare_cached
from moetrain.data.sources import (Corpus, expand_paths, file_format, iter_texts,
                                   load_documents, open_corpus, read_stdlib, read_text_file,
                                   set_offline, stdlib_documents, stdlib_paths, stdlib_root)
from moetrain.data.tokenizers import (EOD_CANDIDATES, EOD_TOKEN, ByteTokenizer, HFTokenizer,
                                      SentencePieceTokenizer, fingerprint, make_tokenizer,
                                      padded_vocab_size, resolve_vocab, train_tokenizer)

__all__ = [
    'Batches', 'ByteTokenizer', 'Component', 'Corpus', 'Data', 'EOD_CANDIDATES', 'EOD_TOKEN',
    'HFTokenizer', 'Prefetch', 'Prepared', 'SentencePieceTokenizer', 'TokenFiles',
    'document_positions', 'document_starts', 'expand_paths', 'file_format', 'fingerprint',
    'is_eval_document', 'iter_texts', 'join_documents', 'load_documents', 'make_data',
    'make_tokenizer', 'open_corpus', 'open_prepared', 'pack', 'padded_vocab_size',
    'prepare_cached', 'process_slice', 'read_stdlib', 'read_text_file',
    'resolve_vocab', 'segment_ids', 'set_offline', 'split_documents', 'state_metrics',
    'stdlib_documents', 'stdlib_paths', 'stdlib_root', 'to_batch', 'to_global',
    'train_tokenizer', 'unigram_entropy',
]
