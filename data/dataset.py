"""Sample files -> tokenized documents (cached) -> packed rows -> micro-batches.

1. ``prepare_file`` streams one JSON array / JSON Lines file, validates every record,
   renders it with the template, tokenizes in batches, truncates or drops overlong
   documents, and writes the result beside the data in ``.ppllm-cache/``: flat int32
   ``tokens``/``labels`` files plus per-document offsets.  The cache is keyed by the file's
   path, size and mtime, the tokenizer's content hash, the template, ``max_seq_len`` and
   ``overlong``; one process builds it (under a file lock), the others memory-map it.
2. ``build_rows`` mixes the sources (optional weights), shuffles documents by seed and
   packs them best-fit into rows of ``max_seq_len`` (or one per row with ``packing: false``).
   Only the row plan (document indices) is held in memory.
3. ``StepLoader`` hands each data-parallel rank its disjoint share of rows, reshuffled per
   epoch, and assembles a row from the memory-mapped tokens only when it is needed.

A row holds input_ids, labels (already shifted; -100 = not trained), position_ids
(restarting per document) and doc_ids (attention never crosses a change; pads are -1).
"""
from __future__ import annotations

import array
import bisect
import codecs
import fcntl
import gc
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from .samples import SAMPLE_TYPES, SampleError, check, parts_for
from .templates import Template, encode_parts

CACHE_VERSION = 1
CHUNK = 4096          # records rendered and tokenized per batch
MAX_LISTED = 1000     # strict mode lists at most this many errors


class DataError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# reading: (line, object) or (line, error) per record, streamed


class RecordError:
    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


def iter_records(path: str, read_bytes=None):
    """Yield ``(line, obj | RecordError)`` for a JSON array or JSON Lines file.

    For a JSON array, ``line`` is where the object starts.  Neither form is read whole:
    JSON Lines goes line by line, an array through a growing window of decoded text.
    ``read_bytes(n)`` is called with the bytes consumed (progress bars).
    """
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(0)
        first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if first == b"[":
            yield from _iter_array(f, read_bytes)
        else:
            yield from _iter_lines(f, read_bytes)


def _iter_lines(f, read_bytes):
    for n, raw in enumerate(f, 1):
        if read_bytes:
            read_bytes(len(raw))
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, RecordError("not UTF-8", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            yield n, RecordError("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_array(f, read_bytes, block: int = 1 << 20):
    dec = codecs.getincrementaldecoder("utf-8")()
    jd = json.JSONDecoder()
    buf, pos, line_at_buf, eof = "", 0, 1, False

    def more() -> str | None:
        """Read the next block; None at the end of the file, error text on bad UTF-8."""
        nonlocal buf, eof
        raw = f.read(block)
        if read_bytes:
            read_bytes(len(raw))
        try:
            buf += dec.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            return f"{e.reason}" + "\0" + str(raw[:e.start].count(b"\n"))
        if not raw:
            eof = True
        return None

    def line_of(p: int) -> int:
        return line_at_buf + buf.count("\n", 0, p)

    def utf8_error(err: str) -> tuple[int, RecordError]:
        reason, nl = err.split("\0")
        return (line_at_buf + buf.count("\n") + int(nl),
                RecordError("not UTF-8", f"not valid UTF-8 ({reason}); the rest of the file is not read"))

    err = more()
    if err:
        yield utf8_error(err)
        return
    buf = buf.lstrip("\ufeff")
    pos = buf.index("[") + 1
    while True:
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            err = more()
            if err:
                yield utf8_error(err)
                return
        if pos >= len(buf):
            yield line_of(pos), RecordError("invalid JSON", "unterminated JSON array (no closing ']')")
            return
        if buf[pos] == "]":
            return
        start_line = line_of(pos)
        while True:
            try:
                obj, end = jd.raw_decode(buf, pos)
                if end == len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                    raise json.JSONDecodeError("number or literal cut at a block end", buf, end)
                break
            except json.JSONDecodeError as e:
                if eof:
                    yield line_of(e.pos), RecordError(
                        "invalid JSON", f"invalid JSON ({e.msg}); the rest of the array is not read")
                    return
                err = more()
                if err:
                    yield utf8_error(err)
                    return
        yield start_line, obj
        pos = end
        if pos > block:  # drop what is consumed so the window stays small
            line_at_buf += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0


def read_records(path: str) -> list[tuple[int, object]]:
    """(line, object) for every record; the first unreadable record raises DataError."""
    out = []
    for line, obj in iter_records(path):
        if isinstance(obj, RecordError):
            raise DataError(f"{path}:{line}: {obj.message}")
        out.append((line, obj))
    return out


# ----------------------------------------------------------------------------------------
# prepare: validate, render, tokenize, truncate -> a cached, memory-mappable source


@dataclass
class Source:
    """One prepared data file: documents as slices of flat token / label arrays."""
    path: str
    tokens: np.ndarray       # int32, all documents back to back
    labels: np.ndarray       # int32, shifted, -100 = not trained
    offsets: np.ndarray      # int64 [docs + 1]
    kinds: np.ndarray        # uint8 index into SAMPLE_TYPES
    lines: np.ndarray        # int32 line of the record in the file
    trained: np.ndarray      # int32 trained labels per document
    meta: dict

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.labels[a:b]


def fit_length(ids: list[int], labels: list[int], cuts: list[int], max_len: int, overlong: str):
    """(ids, labels, status): cut at the last turn boundary that fits, else hard."""
    if len(ids) <= max_len:
        return ids, labels, "ok"
    if overlong == "drop":
        return None, None, "dropped"
    fits = [c for c in cuts if 0 < c <= max_len and any(x != -100 for x in labels[:c])]
    if fits:
        c = fits[-1]
        return ids[:c], labels[:c], "truncated"
    labels = labels[:max_len]
    labels[-1] = -100  # it would predict a token that is no longer there
    return ids[:max_len], labels, "truncated"


def _new_meta(path: str) -> dict:
    return {"version": CACHE_VERSION, "path": path, "records": 0, "samples": {}, "truncated": 0, "dropped": 0,
            "untrained": 0, "skipped": {}, "errors": [], "tokens": 0, "trained_tokens": 0}


def _prepare_into(path: str, template: Template, max_len: int, overlong: str, tok_f, lab_f, progress: bool):
    # millions of small int lists make the cyclic GC rescan them over and over; none form cycles
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _prepare_stream(path, template, max_len, overlong, tok_f, lab_f, progress)
    finally:
        if enabled:
            gc.enable()


def _prepare_stream(path: str, template: Template, max_len: int, overlong: str, tok_f, lab_f, progress: bool):
    meta = _new_meta(path)
    offsets, kinds, lines, trained = [0], [], [], []
    kind_index = {k: i for i, k in enumerate(SAMPLE_TYPES)}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"data {os.path.basename(path)}",
                   disable=not sys.stderr.isatty(), leave=False)
    pending: list[tuple[int, str, object]] = []

    def flush():
        encs = encode_parts(template.tok, [parts_for(template, k, p) for _, k, p in pending])
        # array.fromlist converts each sample's ints in C: about 2x faster than one big list + np.asarray
        chunk_ids = array.array("i")
        chunk_labels = array.array("i")
        for (line, kind, _), enc in zip(pending, encs):
            ids, labels, status = fit_length(enc.ids, enc.labels, enc.cuts, max_len, overlong)
            meta["samples"][kind] = meta["samples"].get(kind, 0) + 1
            if status == "dropped":
                meta["dropped"] += 1
                continue
            n_trained = enc.trained if status == "ok" and enc.trained is not None else len(labels) - labels.count(-100)
            if n_trained == 0:
                meta["untrained"] += 1
                continue
            if status == "truncated":
                meta["truncated"] += 1
            chunk_ids.fromlist(ids)
            chunk_labels.fromlist(labels)
            offsets.append(offsets[-1] + len(ids))
            kinds.append(kind_index[kind])
            lines.append(line)
            trained.append(n_trained)
            meta["trained_tokens"] += n_trained
        tok_f.write(chunk_ids)
        lab_f.write(chunk_labels)
        pending.clear()

    for line, obj in iter_records(path, bar.update if bar else None):
        meta["records"] += 1
        if isinstance(obj, RecordError):
            reason, message = obj.reason, obj.message
        else:
            try:
                kind, payload = check(obj)
                pending.append((line, kind, payload))
                if len(pending) >= CHUNK:
                    flush()
                continue
            except SampleError as e:
                reason, message = e.reason, e.message
        meta["skipped"][reason] = meta["skipped"].get(reason, 0) + 1
        meta["errors"].append(f"{path}:{line}: {message}")
    if pending:
        flush()
    if bar:
        bar.close()
    meta["tokens"] = int(offsets[-1])
    arrays = {"offsets": np.asarray(offsets, dtype=np.int64), "kinds": np.asarray(kinds, dtype=np.uint8),
              "lines": np.asarray(lines, dtype=np.int32), "trained": np.asarray(trained, dtype=np.int32)}
    return meta, arrays


def _cache_key(path: str, template: Template, max_len: int, overlong: str) -> str:
    st = os.stat(path)
    parts = [CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
             getattr(template.tok, "fingerprint", type(template.tok).__name__), template.cache_tag(), max_len, overlong]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _cache_root(path: str) -> str:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), ".ppllm-cache")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    # read-only data folder: a per-user cache (the key includes the absolute path)
    root = os.path.join(os.environ.get("PPLLM_CACHE", os.path.expanduser("~/.cache/ppllm")), "data")
    os.makedirs(root, exist_ok=True)
    return root


def _load_cached(folder: str, path: str) -> Source:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)

    def mm(name):
        p = os.path.join(folder, name)
        return np.memmap(p, dtype=np.int32, mode="r") if os.path.getsize(p) else np.zeros(0, dtype=np.int32)

    arr = np.load(os.path.join(folder, "docs.npz"))
    return Source(path, mm("tokens.bin"), mm("labels.bin"), arr["offsets"], arr["kinds"], arr["lines"],
                  arr["trained"], meta)


def prepare_file(path: str, template: Template, max_len: int, overlong: str = "truncate", cache: bool = True,
                 progress: bool = False) -> Source:
    """The prepared documents of one file, from the cache when it is current."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    if not cache:
        import io
        tok_f, lab_f = io.BytesIO(), io.BytesIO()
        meta, arrays = _prepare_into(path, template, max_len, overlong, tok_f, lab_f, progress)
        return Source(path, np.frombuffer(tok_f.getvalue(), dtype=np.int32),
                      np.frombuffer(lab_f.getvalue(), dtype=np.int32), **arrays, meta=meta)
    root = _cache_root(path)
    base = os.path.basename(path)
    folder = os.path.join(root, f"{base}.{_cache_key(path, template, max_len, overlong)}")
    with open(os.path.join(root, f"{base}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares, the others wait and then read
        if not os.path.isfile(os.path.join(folder, "meta.json")):
            tmp = f"{folder}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with open(os.path.join(tmp, "tokens.bin"), "wb") as tf, open(os.path.join(tmp, "labels.bin"), "wb") as lf:
                meta, arrays = _prepare_into(path, template, max_len, overlong, tf, lf, progress)
            np.savez(os.path.join(tmp, "docs.npz"), **arrays)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            for old in os.listdir(root):  # caches of older versions of this file
                if old.startswith(f"{base}.") and not old.endswith(".lock") and ".tmp" not in old:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            os.replace(tmp, folder)
    return _load_cached(folder, path)


# ----------------------------------------------------------------------------------------
# mixing and packing


@dataclass
class DataStats:
    samples: dict = field(default_factory=dict)    # valid samples per type
    truncated: int = 0
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
    entries = [data_path] if isinstance(data_path, str) else list(data_path)
    if len(data_weights) != len(entries):
        raise DataError(f"data_weights has {len(data_weights)} entries but data_path has {len(entries)}; give one "
                        f"weight per data_path entry")
    out = []
    for entry, w in zip(entries, data_weights):
        if w < 0:
            raise DataError(f"data_weights: {w} for {entry!r} is negative; use 0 to leave a source out")
        out += [float(w)] * len(expand_data_paths(entry))
    return out


def load_sources(files: list[str], template: Template, max_len: int, overlong: str = "truncate",
                 strict: bool = True, cache: bool = True, progress: bool = False) -> list[Source]:
    """Prepare every file; in strict mode any bad sample stops here with all of them listed."""
    if not files:
        raise DataError("no data files given")
    sources = [prepare_file(f, template, max_len, overlong, cache, progress) for f in files]
    errors = [e for s in sources for e in s.meta["errors"]]
    if errors and strict:
        listed = errors[:MAX_LISTED]
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"{len(errors)} bad sample(s) (strict: true stops here; strict: false skips them and "
                        f"counts them per reason):\n" + "\n".join(f"  {e}" for e in listed) + more)
    return sources


def build_rows(files: list[str], template: Template, max_len: int, packing: bool = True,
               overlong: str = "truncate", seed: int = 0, strict: bool = True, weights: list[float] | None = None,
               cache: bool = True, progress: bool = False) -> tuple[PackedRows, DataStats]:
    sources = load_sources(files, template, max_len, overlong, strict, cache, progress)
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
        stats.dropped += m["dropped"] + m["untrained"]
        docs = _weighted(len(s.lengths), 1.0 if weights is None else weights[s_i], rng)
        stats.sources[s.path] = len(docs)
        picked_src.append(np.full(len(docs), s_i, dtype=np.int32))
        picked_doc.append(docs)
    src = np.concatenate(picked_src)
    doc = np.concatenate(picked_doc)
    if not len(doc):
        raise DataError(f"no trainable samples in {', '.join(files)}")
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


# ----------------------------------------------------------------------------------------
# the step stream


class StepLoader:
    """Deterministic, data-parallel-sharded stream of optimizer steps.

    Each step is a list of ``grad_accum`` micro-batches ``((ids, pos, doc), labels)``.
    Rows are reshuffled every epoch from ``seed + epoch``; rank r takes every dp-th row,
    every rank sees the same number of steps, and rows are assembled only when used.
    ``rows`` is a PackedRows or a dict of equally long [rows, seq] arrays.
    """

    def __init__(self, rows, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int):
        self.rows = rows
        self.mbs, self.gas = micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.n = len(rows) if isinstance(rows, PackedRows) else len(rows["input_ids"])
        n = self.n
        self.steps_per_epoch = n // dp_size // (micro_batch * grad_accum)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} rows of data are not enough for one optimizer step: it needs micro batch "
                            f"{micro_batch} x gradient_accumulation_steps {grad_accum} x data {dp_size} = "
                            f"{micro_batch * grad_accum * dp_size} rows; add data or shrink the batch")
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    has_data = True

    def limit_steps_per_epoch(self, steps: int) -> None:
        """Every data-reading rank must run the same number of steps: take the agreed minimum."""
        if steps != self.steps_per_epoch:
            self.steps_per_epoch = steps
            self._order_cache = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(self.n)
            per_rank = self.steps_per_epoch * self.mbs * self.gas
            self._order_cache = (epoch, order[self.dp_rank::self.dp_size][:per_rank])
        return self._order_cache[1]

    def _fetch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.rows, PackedRows):
            return self.rows.get(idx)
        return {name: np.asarray(arr[idx]) for name, arr in self.rows.items()}

    def next_step(self) -> list:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        order = self._order(self.epoch)
        k = self.step_in_epoch * self.mbs * self.gas
        self.step_in_epoch += 1
        batches = []
        for m in range(self.gas):
            rows = self._fetch(order[k + m * self.mbs: k + (m + 1) * self.mbs])
            t = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in rows.items()}
            batches.append(((t["input_ids"], t["position_ids"], t["doc_ids"]), t["labels"]))
        return batches


def trained_tokens(batches: list) -> int:
    return int(sum((labels != -100).sum() for _, labels in batches))
