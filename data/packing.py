"""Packing: the prepared sources, mixed (optional weights), shuffled by seed and packed best-fit
into rows of ``max_seq_len`` (or one document per row with ``packing: false``). Only the row plan
(document indices) is held in memory; ``PackedRows`` assembles a row from the memory-mapped
tokens when a micro-batch needs it.

A row holds input_ids, labels (already shifted; -100 = not trained), position_ids
(restarting per document) and doc_ids (attention never crosses a change; pads are -1).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .prepare import Source, load_sources
from .records import DataError
from .templates import Template


@dataclass
class DataStats:
    samples: dict = field(default_factory=dict)    # valid samples per type
    windowed: int = 0                              # pretraining documents split into windows ...
    windows: int = 0                               # ... and the windows they became
    truncated: int = 0                             # conversations / instructions cut (overlong: truncate)
    dropped: int = 0                               # overlong (overlong: drop) or nothing left to train
    skipped: dict = field(default_factory=dict)    # bad samples per reason (strict: false)
    tokens: int = 0                                # real tokens in the rows
    trained_tokens: int = 0
    rows: int = 0
    row_len: int = 1
    docs: int = 0
    sources: dict = field(default_factory=dict)    # file -> documents used (after weights)
    template: str = ""

    @property
    def efficiency(self) -> float:
        """Real tokens / all token slots."""
        return self.tokens / max(1, self.rows * self.row_len)

    @property
    def padded_efficiency(self) -> float:
        """What one document per row (padding to max_seq_len) would give."""
        return self.tokens / max(1, self.docs * self.row_len)


def pack_lengths(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """Best fit, online: each document goes to the open row with the least room that holds it."""
    rows: list[list[int]] = []
    by_free: dict[int, list[int]] = {}
    present: list[int] = []  # sorted free sizes that have open rows
    for i, n in enumerate(lengths.tolist()):
        j = bisect.bisect_left(present, n)
        if j == len(present):
            r, rem = len(rows), max_len - n
            rows.append([i])
        else:
            free = present[j]
            bucket = by_free[free]
            r = bucket.pop()
            if not bucket:
                present.pop(j)
            rows[r].append(i)
            rem = free - n
        if rem > 0:
            bucket = by_free.setdefault(rem, [])
            if not bucket:
                bisect.insort(present, rem)
            bucket.append(r)
    return rows


def _weighted(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Document indices for one source: ``weight`` copies on average (2.5 = twice + half)."""
    whole = int(weight)
    idx = [np.arange(n)] * whole
    frac = weight - whole
    if frac > 0:
        idx.append(np.sort(rng.permutation(n)[:int(round(frac * n))]))
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


class PackedRows:
    """Rows of documents, assembled from the prepared sources on demand."""

    def __init__(self, sources: list[Source], plan: list[list[tuple[int, int]]], max_len: int, pad_id: int):
        self.sources, self.max_len, self.pad_id = sources, max_len, pad_id
        self.row_ptr = np.zeros(len(plan) + 1, dtype=np.int64)
        self.row_ptr[1:] = np.cumsum([len(r) for r in plan])
        flat = [d for r in plan for d in r]
        self.item_src = np.asarray([s for s, _ in flat], dtype=np.int32)
        self.item_doc = np.asarray([d for _, d in flat], dtype=np.int64)
        self._full: dict | None = None

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def get(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        L = self.max_len
        out = {"input_ids": np.full((len(idx), L), self.pad_id, dtype=np.int64),
               "labels": np.full((len(idx), L), -100, dtype=np.int64),
               "position_ids": np.zeros((len(idx), L), dtype=np.int64),
               "doc_ids": np.full((len(idx), L), -1, dtype=np.int64)}
        for k, r in enumerate(idx.tolist()):
            at = 0
            for d_i, item in enumerate(range(self.row_ptr[r], self.row_ptr[r + 1])):
                ids, labels = self.sources[self.item_src[item]].doc(int(self.item_doc[item]))
                n = len(ids)
                out["input_ids"][k, at:at + n] = ids
                out["labels"][k, at:at + n] = labels
                out["position_ids"][k, at:at + n] = np.arange(n)
                out["doc_ids"][k, at:at + n] = d_i
                at += n
        return out

    def documents(self, r: int) -> list[tuple[int, int]]:
        return [(int(self.item_src[i]), int(self.item_doc[i])) for i in range(self.row_ptr[r], self.row_ptr[r + 1])]

    def __getitem__(self, name: str) -> np.ndarray:
        """Whole arrays (small data, tests): ``rows["input_ids"]``."""
        if self._full is None:
            self._full = self.get(np.arange(len(self)))
        return self._full[name]

    def keys(self):
        return ("input_ids", "labels", "position_ids", "doc_ids")


def source_weights(data_path, data_weights) -> list[float] | None:
    """Per-file weights from the config: ``data_weights[i]`` applies to every file of entry i."""
    if data_weights is None:
        return None
    from ppllm.config import expand_data_paths
    entries = list(data_path) if isinstance(data_path, list) else [data_path]
    if len(data_weights) != len(entries):
        raise DataError(f"data_weights has {len(data_weights)} entries but data_path has {len(entries)}; give one "
                        f"weight per data_path entry")
    out = []
    for entry, w in zip(entries, data_weights):
        if w < 0:
            raise DataError(f"data_weights: {w} for {entry!r} is negative; use 0 to leave a source out")
        out += [float(w)] * len(expand_data_paths(entry))
    return out


def build_rows(files: list[str], template: Template, max_len: int, packing: bool = True,
               overlong: str = "truncate", seed: int = 0, strict: bool = True, weights: list[float] | None = None,
               cache: bool = True, progress: bool = False, workers: int | None = None,
               fields: list[dict | None] | None = None, cache_dir: str | None = None) -> tuple[PackedRows, DataStats]:
    sources = load_sources(files, template, max_len, overlong, strict, cache, progress, workers, fields, cache_dir)
    if weights is not None and len(weights) != len(files):
        raise DataError(f"{len(weights)} weights for {len(files)} data files")
    stats = DataStats(row_len=max_len)
    rng = np.random.default_rng(seed)
    picked_src, picked_doc = [], []
    for s_i, s in enumerate(sources):
        m = s.meta
        for k, v in m["samples"].items():
            stats.samples[k] = stats.samples.get(k, 0) + v
        for k, v in m["skipped"].items():
            stats.skipped[k] = stats.skipped.get(k, 0) + v
        stats.truncated += m["truncated"]
        stats.windowed += m["windowed"]
        stats.windows += m["windows"]
        stats.dropped += m["dropped"] + m["untrained"]
        docs = _weighted(len(s.lengths), 1.0 if weights is None else weights[s_i], rng)
        stats.sources[s.path] = len(docs)
        picked_src.append(np.full(len(docs), s_i, dtype=np.int32))
        picked_doc.append(docs)
    src = np.concatenate(picked_src)
    doc = np.concatenate(picked_doc)
    if not len(doc):
        why = [f"{sum(stats.samples.values())} valid sample(s)"]
        dropped = sum(s.meta["dropped"] for s in sources)
        if dropped:
            why.append(f"{dropped} longer than max_seq_len {max_len} and dropped (overlong: drop; "
                       f"overlong: truncate keeps them)")
        untrained = sum(s.meta["untrained"] for s in sources)
        if untrained:
            why.append(f"{untrained} with no token to train")
        if stats.skipped:
            why.append(f"{sum(stats.skipped.values())} bad sample(s) skipped (strict: false)")
        if weights is not None and not any(weights):
            why.append("every data_weights entry is 0")
        raise DataError(f"no trainable samples in {', '.join(files)}: " + "; ".join(why))
    order = rng.permutation(len(doc))
    src, doc = src[order], doc[order]
    lengths = np.asarray([sources[s].offsets[d + 1] - sources[s].offsets[d] for s, d in zip(src.tolist(), doc.tolist())],
                         dtype=np.int64)
    groups = pack_lengths(lengths, max_len) if packing else [[i] for i in range(len(doc))]
    plan = [[(int(src[i]), int(doc[i])) for i in g] for g in groups]
    stats.rows, stats.docs = len(plan), len(doc)
    stats.tokens = int(lengths.sum())
    stats.trained_tokens = int(sum(int(sources[s].trained[d]) for s, d in zip(src.tolist(), doc.tolist())))
    return PackedRows(sources, plan, max_len, template.tok.pad_id), stats


