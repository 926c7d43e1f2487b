"""Sample files -> tokenized documents (cached) -> packed rows -> a continuous stream of steps.

The data package has one module per concern; this module gathers their public names:

1. ``data.records``: reading. Every input file -> ``(line, record | RecordError)``, streamed,
   and the chunks of records the preparing side hands to its workers.
2. ``data.prepare``: preparing the cache. Validate, render and tokenize every record (a pool of
   worker processes), window long pretraining documents, fit the rest to ``max_seq_len``, and
   write flat memory-mappable token / label files keyed by the file and the tokenizer settings.
3. ``data.packing``: mixing (weights), shuffling and best-fit packing into rows.
4. ``data.stream``: the endless, data-parallel-sharded stream of optimizer steps (``StepLoader``).
"""
from __future__ import annotations

from .packing import DataStats, PackedRows, build_rows, pack_lengths, source_weights
from .prepare import (MAX_LISTED, Source, cache_folder, chunk_labels, fit_length, load_sources, prepare_file,
                      prepare_workers, pretrain_frame, split_windows)
from .records import DataError, RecordError, iter_records, read_records
from .stream import StepLoader, total_steps, trained_tokens

__all__ = ["DataError", "DataStats", "MAX_LISTED", "PackedRows", "RecordError", "Source", "StepLoader", "build_rows",
           "cache_folder", "chunk_labels", "fit_length", "iter_records", "load_sources", "pack_lengths",
           "prepare_file", "prepare_workers", "pretrain_frame", "read_records", "source_weights", "split_windows",
           "total_steps", "trained_tokens"]
