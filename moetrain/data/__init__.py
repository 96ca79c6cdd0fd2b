"""Data: sources, tokenizers, packing, per-process batches, prefetch.

One concern per module:
  sources.py     the documents of stdlib / files / hub sources, in a fixed order
  tokenizers.py  byte, HF tokenizers and sentencepiece tokenizers; the model vocabulary
  packing.py     the split by document, rows of packed documents, segment ids, batch dicts
  loader.py      row streams, process slices, prefetch, global arrays, `make_data`

The names below are the package's public interface (`from moetrain import data`).
"""

from moetrain.data.loader import (Batches, Data, Prefetch, agree_on_error, make_data,
                                  process_slice, to_global)
from moetrain.data.packing import (deal_streams, document_positions, document_starts,
                                   epoch_order, pack, pack_streams, segment_ids,
                                   split_documents, to_batch, unigram_entropy)
from moetrain.data.sources import (Corpus, expand_paths, file_format, load_documents,
                                   open_corpus, read_stdlib, read_text_file, set_offline,
                                   stdlib_documents, stdlib_paths, stdlib_root)
from moetrain.data.tokenizers import (EOD_CANDIDATES, EOD_TOKEN, ByteTokenizer, HFTokenizer,
                                      SentencePieceTokenizer, make_tokenizer,
                                      padded_vocab_size, resolve_vocab, train_tokenizer)

__all__ = [
    'Batches', 'ByteTokenizer', 'Corpus', 'Data', 'EOD_CANDIDATES', 'EOD_TOKEN',
    'HFTokenizer', 'Prefetch', 'SentencePieceTokenizer', 'agree_on_error', 'deal_streams',
    'document_positions', 'document_starts', 'epoch_order', 'expand_paths', 'file_format',
    'load_documents', 'make_data', 'make_tokenizer', 'open_corpus', 'pack', 'pack_streams',
    'padded_vocab_size', 'process_slice', 'read_stdlib', 'read_text_file', 'resolve_vocab',
    'segment_ids', 'set_offline', 'split_documents', 'stdlib_documents', 'stdlib_paths',
    'stdlib_root', 'to_batch', 'to_global', 'train_tokenizer', 'unigram_entropy',
]
