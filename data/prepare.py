"""Preparing the cache: records -> validated, rendered, tokenized documents in memory-mappable files.

``prepare_file`` streams one file's chunks of records (``data.records``) through a pool of
worker processes (every core; results are written in file order, a few chunks in flight, so
memory does not grow with the corpus). A worker validates each record, renders it with the
template and tokenizes it. A ``pretrain`` document longer than ``max_seq_len`` becomes
consecutive windows that together train every token once (``split_windows``); other samples
are truncated at a turn boundary or dropped (``overlong``). The result goes beside the data in
``.ppllm-cache/``: flat int32 ``tokens``/``labels`` files plus per-document offsets. The cache
is keyed by the file's path, size and mtime, the tokenizer's content hash, the template,
``max_seq_len`` and ``overlong``; one process builds it (under a file lock), the others
memory-map it.
"""
from __future__ import annotations

import array
import fcntl
import gc
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

from .records import DataError, RecordError, chunk_records, load_reader, location, parse, record_chunks
from .samples import SAMPLE_TYPES, SampleError, check, parts_for
from .templates import Target, Template, encode_parts

CACHE_VERSION = 2
POOL_MIN_BYTES = 4 << 20  # smaller files are tokenized in the calling process (no pool start-up)
MAX_LISTED = 1000     # strict mode lists at most this many errors


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
    """(ids, labels, status) of a conversation or instruction: cut at the last turn boundary
    that fits, else hard at max_len; or drop it."""
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


def split_windows(labels: list[int], max_len: int) -> list[int]:
    """Window ends of a pretraining document: consecutive slices of at most ``max_len`` tokens.

    The labels are kept as they are, so the last position of a window keeps its target, the
    first token of the next window: every token is the target of exactly one position (the
    one before it, in the same window or at the end of the previous one) and no token is lost.
    The first token of a window is only an input there. A trailing window with nothing left
    to train (the EOS alone, already the target of the window before) is left out.
    """
    n = len(labels)
    ends = list(range(max_len, n, max_len)) + [n]
    while len(ends) > 1 and all(x == -100 for x in labels[ends[-2]:ends[-1]]):
        ends.pop()
    return ends


def _new_meta(path: str) -> dict:
    return {"version": CACHE_VERSION, "path": path, "records": 0, "samples": {}, "truncated": 0, "dropped": 0,
            "untrained": 0, "windowed": 0, "windows": 0, "skipped": {}, "errors": [], "n_errors": 0,
            "tokens": 0, "trained_tokens": 0, "encoded_tokens": 0, "encoded_trained": 0}


_COUNTERS = ("records", "truncated", "dropped", "untrained", "windowed", "windows", "n_errors", "encoded_tokens",
             "encoded_trained")


# -- one chunk of records -> arrays (in a worker process, or inline for small files) ------

_WORKER: dict = {}


def _init_worker(template: Template, max_len: int, overlong: str, fields: dict | None = None) -> None:
    # forked from a rank: its handlers (a SIGTERM that raises to stop training) are not the worker's. The pool
    # ends its workers with SIGTERM when the preparation stops (a data error, a signal); they just go, no
    # traceback. Ctrl-C reaches the whole process group: the rank handles it and ends the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism: one thread per worker
    if hasattr(template.tok, "threads"):
        template.tok.threads = 1
    gc.disable()  # millions of small int lists make the cyclic GC rescan them over and over; none form cycles
    _WORKER.update(template=template, max_len=max_len, overlong=overlong, fields=fields,
                   frame=pretrain_frame(template) if FAST_PRETRAIN else None)


def map_fields(obj, fields: dict | None):
    """A record with its columns renamed to sample fields (``{"text": "content"}``: content -> text)."""
    if not fields or not isinstance(obj, dict):
        return obj
    obj = dict(obj)
    for target, column in fields.items():
        if column not in obj:
            have = ", ".join(repr(k) for k in list(obj)[:8])
            raise SampleError("missing field", f"column {column!r} (data_path reads it as {target!r}) is missing; "
                                               f"the record has {have}")
        obj[target] = obj.pop(column)
    return obj


FAST_PRETRAIN = True  # tests turn it off to compare with the general encoder


def pretrain_frame(template: Template) -> tuple[list[int], list[int]] | None:
    """(prefix ids, suffix ids) when the template renders a pretraining text as literal untrained
    prefix ids + the trained text + literal trained suffix ids (every template here: BOS / EOS
    or their family's markers). Such a document's labels are its own ids shifted by one, so it
    needs no label list: the worker writes its ids straight from the tokenizer's output."""
    marker = "\x00ppllm-text\x00"
    parts = template.pretrain_parts(marker)
    at = [i for i, p in enumerate(parts) if isinstance(p, tuple) and p[0] == marker]
    if len(at) != 1 or not parts[at[0]][1]:
        return None
    prefix, suffix = parts[:at[0]], parts[at[0] + 1:]
    literal = all(isinstance(p, tuple) and isinstance(p[0], list) and p[0] for p in prefix + suffix)
    if not literal or any(p[1] for p in prefix) or not all(p[1] for p in suffix) or not suffix:
        return None
    return [i for p in prefix for i in p[0]], [i for p in suffix for i in p[0]]



def _chunk_work(path: str, chunk) -> dict:
    """Validate, render, tokenize and fit one chunk of records."""
    template, max_len, overlong = _WORKER["template"], _WORKER["max_len"], _WORKER["overlong"]
    out = {k: 0 for k in _COUNTERS}
    out.update(samples={}, skipped={}, errors=[])
    frame, fields = _WORKER.get("frame"), _WORKER.get("fields")
    good, parts, fast, texts = [], [], [], []
    for line, item in chunk_records(path, chunk):
        out["records"] += 1
        obj = parse(item)
        if isinstance(obj, RecordError):
            reason, message = obj.reason, obj.message
        else:
            try:
                kind, payload = check(map_fields(obj, fields))
                good.append((line, kind))
                if frame is not None and kind == "pretrain":
                    fast.append(len(good) - 1)
                    texts.append(payload)
                else:
                    parts.append(parts_for(template, kind, payload))
                continue
            except SampleError as e:
                reason, message = e.reason, e.message
        out["skipped"][reason] = out["skipped"].get(reason, 0) + 1
        out["n_errors"] += 1
        if len(out["errors"]) < MAX_LISTED:
            out["errors"].append(f"{path}:{location(chunk, line)}: {message}")
    encs = iter(encode_parts(template.tok, parts))
    fast_toks = iter(template.tok.encode_batch(texts))
    fast_at = set(fast)
    # array.fromlist converts each sample's ints in C: about 2x faster than one big list + np.asarray
    ids_out = array.array("i")
    lens, kinds, lines, trained = array.array("q"), array.array("B"), array.array("i"), array.array("i")
    # labels: most documents' labels are their own next tokens (pretraining text: every position
    # trained but the last): those come from one shifted copy of the ids below; the others
    # (and the last label of a cut document) are written over it
    explicit: list[tuple[int, list[int]]] = []
    kind_index = {k: i for i, k in enumerate(SAMPLE_TYPES)}
    samples = out["samples"]
    parts_iter = iter(parts)
    for g, (line, kind) in enumerate(good):
        samples[kind] = samples.get(kind, 0) + 1
        if g in fast_at:
            _fast_pretrain(next(fast_toks), frame, max_len, out, ids_out, lens, trained, explicit)
            kinds.extend([kind_index[kind]] * (len(lens) - len(kinds)))
            lines.extend([line] * (len(lens) - len(lines)))
            continue
        enc, doc_parts = next(encs), next(parts_iter)
        ids, labels = enc.ids, enc.labels
        n_all = enc.trained if enc.trained is not None else len(labels) - labels.count(-100)
        out["encoded_tokens"] += len(ids)
        out["encoded_trained"] += n_all
        if n_all == 0:
            out["untrained"] += 1
            continue
        at0 = len(ids_out)
        shifted = n_all == len(ids) - 1 and labels[-1] == -100 and not any(isinstance(p, Target) for p in doc_parts)
        if kind == "pretrain" and len(ids) > max_len:
            ends = split_windows(labels, max_len)
            out["windowed"] += 1
            out["windows"] += len(ends)
            at = 0
            for end in ends:
                lens.append(end - at)
                trained.append(end - at - (labels[at:end].count(-100) if not shifted else int(end == len(ids))))
                at = end
            if at < len(ids):  # the left-out EOS window: the last kept label points past the kept ids
                explicit.append((at0 + at - 1, labels[at - 1:at]))
            ids, labels = ids[:at], labels[:at]
        else:
            cut_ids, cut_labels, status = fit_length(ids, labels, enc.cuts, max_len, overlong)
            if status == "dropped":
                out["dropped"] += 1
                continue
            n_trained = n_all if status == "ok" else len(cut_labels) - cut_labels.count(-100)
            if n_trained == 0:
                out["untrained"] += 1
                continue
            if status == "truncated":
                out["truncated"] += 1
                shifted = False
            ids, labels = cut_ids, cut_labels
            lens.append(len(ids))
            trained.append(n_trained)
            ends = [len(ids)]
        kinds.extend([kind_index[kind]] * len(ends))
        lines.extend([line] * len(ends))
        ids_out.fromlist(ids)
        if shifted:
            explicit.append((at0 + len(ids) - 1, labels[-1:]))
        else:
            explicit.append((at0, labels))
    # the labels travel as the exceptions to the shift only (chunk_labels rebuilds them): half the bytes
    fix_at = array.array("q", [at for at, _ in explicit])
    fix_len = array.array("q", [len(v) for _, v in explicit])
    fix_values = array.array("i")
    for _, values in explicit:
        fix_values.fromlist(values)
    out.update(ids=ids_out.tobytes(), fixes=(fix_at, fix_len, fix_values.tobytes()), lens=lens, kinds=kinds,
               lines=lines, trained=trained)
    return out


def chunk_labels(ids: bytes, fixes) -> np.ndarray:
    """A chunk's labels: its ids shifted by one (each position's next token), then the exceptions
    (untrained positions, document ends, truncated or non-next-token labels) written over it."""
    ids_np = np.frombuffer(ids, dtype=np.int32)
    labels = np.empty_like(ids_np)
    labels[:-1] = ids_np[1:]
    fix_at, fix_len, fix_values = fixes
    values = np.frombuffer(fix_values, dtype=np.int32)
    k = 0
    for at, n in zip(fix_at, fix_len):
        labels[at:at + n] = values[k:k + n]
        k += n
    return labels


def _fast_pretrain(toks: list[int], frame, max_len: int, out: dict, ids_out, lens, trained, explicit) -> None:
    """One pretraining document as prefix + text + suffix ids, labels by the shift (see
    pretrain_frame): the same ids, labels, windows and counts as the general path."""
    prefix, suffix = frame
    m, n = len(prefix), len(prefix) + len(toks) + len(suffix)
    lead = max(m - 1, 0)  # positions before the first target
    out["encoded_tokens"] += n
    if n - max(m, 1) <= 0:
        out["untrained"] += 1
        return
    out["encoded_trained"] += n - max(m, 1)
    at0 = len(ids_out)
    ids_out.fromlist(prefix)
    ids_out.fromlist(toks)
    ids_out.fromlist(suffix)
    ends = [n]
    if n > max_len:
        ends = list(range(max_len, n, max_len)) + [n]
        if ends[-1] - ends[-2] == 1:  # a window of the last token alone trains nothing: it is the target before
            ends.pop()
        out["windowed"] += 1
        out["windows"] += len(ends)
    a = 0
    for b in ends:
        lens.append(b - a)
        trained.append(b - a - max(0, min(b, lead) - a) - int(b == n))
        a = b
    if lead:
        explicit.append((at0, [-100] * lead))
    if ends[-1] < n:
        explicit.append((at0 + ends[-1] - 1, [ids_out[at0 + ends[-1]]]))
        del ids_out[at0 + ends[-1]:]
    else:
        explicit.append((at0 + n - 1, [-100]))



def prepare_workers(path: str, workers: int | None) -> int:
    """Processes that tokenize a file: ``workers``, else ``$PPLLM_DATA_WORKERS``, else every core of
    this machine for a file of POOL_MIN_BYTES or more and 1 (no pool) for a smaller one."""
    if workers is None and os.environ.get("PPLLM_DATA_WORKERS"):
        workers = int(os.environ["PPLLM_DATA_WORKERS"])
    if workers is not None:
        return max(1, workers)
    if os.path.getsize(path) < POOL_MIN_BYTES:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class Progress:
    """Progress of a preparation in the file's bytes: a bar on a terminal, otherwise a line every
    ``PPLLM_PROGRESS_S`` seconds (default 30) with the share done, the throughput and an ETA."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.done, self.tokens = label, max(1, total), 0, 0
        self.t0 = self.last = time.monotonic()
        self.every = float(os.environ.get("PPLLM_PROGRESS_S", "30"))
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"data {label}", leave=False)

    def read(self, n: int) -> None:
        self.done += n
        if self.bar:
            self.bar.update(n)

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        now = time.monotonic()
        if self.enabled and not self.bar and now - self.last >= self.every:
            self.last = now
            print(f"data: {self.label} {self.line()}", flush=True)

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        frac = min(1.0, self.done / self.total)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 and frac < 1 else 0.0
        return (f"{frac:.0%} ({self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB), {rate / 1e6:.1f} MB/s, "
                f"{self.tokens / dt / 1e3:.1f}k tokens/s, ETA {_hms(eta)}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _prepare_into(path: str, template: Template, max_len: int, overlong: str, tok_f, lab_f, progress: bool,
                  workers: int | None = None, fields: dict | None = None):
    """Stream ``path`` through the workers in order; tokens/labels go to the files as chunks finish,
    so memory stays at a few chunks per worker whatever the corpus size."""
    meta = _new_meta(path)
    offsets, kinds, lines, trained = array.array("q", [0]), array.array("B"), array.array("i"), array.array("i")
    bar = Progress(os.path.basename(path), os.path.getsize(path), progress)

    def consume(r: dict) -> None:
        for k in _COUNTERS:
            meta[k] += r[k]
        for name in ("samples", "skipped"):
            for k, v in r[name].items():
                meta[name][k] = meta[name].get(k, 0) + v
        meta["errors"] += r["errors"][:MAX_LISTED - len(meta["errors"])]
        bar.add_tokens(len(r["ids"]) // 4)
        tok_f.write(r["ids"])
        lab_f.write(chunk_labels(r["ids"], r["fixes"]).tobytes())
        at = offsets[-1]
        for n in r["lens"]:
            at += n
            offsets.append(at)
        kinds.extend(r["kinds"])
        lines.extend(r["lines"])
        trained.extend(r["trained"])

    n_workers = prepare_workers(path, workers)
    meta["workers"] = n_workers
    load_reader(path)
    chunks = record_chunks(path, bar.read)
    if n_workers == 1:
        saved = dict(_WORKER)
        enabled = gc.isenabled()
        _init_worker_inline(template, max_len, overlong, fields)
        try:
            for chunk in chunks:
                consume(_chunk_work(path, chunk))
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
            if enabled:
                gc.enable()
    else:
        import multiprocessing as mp
        from collections import deque
        # fork: the workers start at once and inherit the imported modules; they only tokenize
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=(template, max_len, overlong, fields)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_chunk_work, (path, chunk)))
                while len(pending) >= 2 * n_workers:  # bounded read-ahead, results in file order
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
    bar.close()
    meta["tokens"] = int(offsets[-1])
    meta["trained_tokens"] = int(np.asarray(trained, dtype=np.int64).sum()) if len(trained) else 0
    arrays = {"offsets": np.frombuffer(offsets, dtype=np.int64).copy(),
              "kinds": np.frombuffer(kinds, dtype=np.uint8).copy(),
              "lines": np.frombuffer(lines, dtype=np.int32).copy(),
              "trained": np.frombuffer(trained, dtype=np.int32).copy()}
    return meta, arrays


def _init_worker_inline(template: Template, max_len: int, overlong: str, fields: dict | None = None) -> None:
    gc.disable()
    _WORKER.update(template=template, max_len=max_len, overlong=overlong, fields=fields,
                   frame=pretrain_frame(template) if FAST_PRETRAIN else None)


def _cache_key(path: str, template: Template, max_len: int, overlong: str, fields: dict | None = None) -> str:
    st = os.stat(path)
    parts = [CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
             getattr(template.tok, "fingerprint", type(template.tok).__name__), template.cache_tag(), max_len, overlong]
    if fields:
        parts.append(sorted(fields.items()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _cache_root(path: str, cache_dir: str | None = None) -> str:
    if cache_dir:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"cache_dir {cache_dir!r} cannot be created ({e.strerror}); give a writable folder") from e
        return cache_dir
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


def _entry_prefix(path: str) -> str:
    """``<file name>.<hash of its absolute path>.``: the entries of one file (files of one name in
    different folders share a cache_dir without touching each other's entries)."""
    return f"{os.path.basename(path)}.{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}."


def _load_cached(folder: str, path: str) -> Source:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)

    def mm(name):
        p = os.path.join(folder, name)
        return np.memmap(p, dtype=np.int32, mode="r") if os.path.getsize(p) else np.zeros(0, dtype=np.int32)

    arr = np.load(os.path.join(folder, "docs.npz"))
    return Source(path, mm("tokens.bin"), mm("labels.bin"), arr["offsets"], arr["kinds"], arr["lines"],
                  arr["trained"], meta)


def _remove_stale_staging(root: str, prefix: str) -> None:
    """Staging folders of this file left by killed preparations on this host (their process is gone)."""
    host = socket.gethostname()
    for name in os.listdir(root):
        if not name.startswith(prefix) or ".tmp" not in name:
            continue
        owner = name.rsplit(".tmp", 1)[1]
        pid = owner.rsplit("-", 1)[-1]
        if owner.startswith("-") and not owner.startswith(f"-{host}-"):
            continue  # another host's preparation: it may still be running
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def cache_folder(path: str, template: Template, max_len: int, overlong: str = "truncate", fields: dict | None = None,
                 cache_dir: str | None = None) -> str:
    """Where the prepared form of ``path`` lives (it is complete when the folder exists: an entry
    appears only by the rename of a complete staging folder)."""
    return os.path.join(_cache_root(path, cache_dir),
                        _entry_prefix(path) + _cache_key(path, template, max_len, overlong, fields))


class _Lock:
    """An flock on one machine, so that its ranks (or a dry run) do not prepare a file twice. It is
    only an economy: correctness never depends on it (network filesystems may not honour flock), since
    entries are published by an atomic rename. ``PPLLM_CACHE_LOCK=0`` turns it off."""

    def __init__(self, path: str):
        self.path, self.f = path, None

    def __enter__(self):
        if os.environ.get("PPLLM_CACHE_LOCK", "1") != "0":
            try:
                self.f = open(self.path, "w")
                fcntl.flock(self.f, fcntl.LOCK_EX)
            except OSError:  # no locks here (some network filesystems): the rename still decides
                self.f = None
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()


def prepare_file(path: str, template: Template, max_len: int, overlong: str = "truncate", cache: bool = True,
                 progress: bool = False, workers: int | None = None, fields: dict | None = None,
                 cache_dir: str | None = None) -> Source:
    """The prepared documents of one file, from the cache when it is there.

    ``workers`` tokenizing processes (default: every core for a file of 4 MB or more); ``fields``
    maps sample fields to the file's columns; ``cache_dir`` is the (shared) cache folder, default
    ``.ppllm-cache`` beside the data. Any number of processes, on any number of machines, may call
    this for one file at once: each entry is staged in a folder of its own and published by one
    atomic rename; a preparer that finds the entry published meanwhile discards its own and uses it.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    if not cache:
        import io
        tok_f, lab_f = io.BytesIO(), io.BytesIO()
        meta, arrays = _prepare_into(path, template, max_len, overlong, tok_f, lab_f, progress, workers, fields)
        return Source(path, np.frombuffer(tok_f.getvalue(), dtype=np.int32),
                      np.frombuffer(lab_f.getvalue(), dtype=np.int32), **arrays, meta=meta)
    folder = cache_folder(path, template, max_len, overlong, fields, cache_dir)
    root, prefix = os.path.dirname(folder), _entry_prefix(path)
    if os.path.isdir(folder):
        return _load_cached(folder, path)
    with _Lock(os.path.join(root, prefix + "lock")):
        if not os.path.isdir(folder):
            _stage(path, folder, root, prefix, template, max_len, overlong, progress, workers, fields)
    return _load_cached(folder, path)


def _stage(path, folder, root, prefix, template, max_len, overlong, progress, workers, fields) -> None:
    _remove_stale_staging(root, prefix)
    tmp = f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rank = f" on rank {os.environ['RANK']}" if "RANK" in os.environ else ""
    print(f"data: preparing {path} ({os.path.getsize(path) / 1e6:.1f} MB) with "
          f"{prepare_workers(path, workers)} tokenizing process(es){rank}; cache {folder}", flush=True)
    t0 = time.monotonic()
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as tf, open(os.path.join(tmp, "labels.bin"), "wb") as lf:
            meta, arrays = _prepare_into(path, template, max_len, overlong, tf, lf, progress, workers, fields)
        meta["prepared_by"] = {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK")}
        np.savez(os.path.join(tmp, "docs.npz"), **arrays)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, folder)  # atomic: the entry appears complete, or not at all
        except OSError:
            if not os.path.isdir(folder):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another preparer published it first: use theirs
            print(f"data: {path} was prepared meanwhile by another process; using its cache entry", flush=True)
            return
    except BaseException:  # an error, Ctrl-C, a full disk: leave no half-written staging folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in os.listdir(root):  # entries of older versions of this file (other content or settings)
        if old.startswith(prefix) and old != os.path.basename(folder) and not old.endswith("lock") \
                and ".tmp" not in old:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dt = time.monotonic() - t0
    if progress:
        print(f"data: prepared {path}: {meta['records']} records, {meta['tokens']} tokens in {dt:.1f} s "
              f"({os.path.getsize(path) / 1e6 / max(dt, 1e-9):.1f} MB/s, {meta['tokens'] / max(dt, 1e-9) / 1e3:.1f}k "
              f"tokens/s)", flush=True)


def load_sources(files: list[str], template: Template, max_len: int, overlong: str = "truncate",
                 strict: bool = True, cache: bool = True, progress: bool = False,
                 workers: int | None = None, fields: list[dict | None] | None = None,
                 cache_dir: str | None = None) -> list[Source]:
    """Prepare every file; in strict mode any bad sample stops here with all of them listed.
    ``fields``: the field mapping of each file (or None)."""
    if not files:
        raise DataError("no data files given")
    fields = fields or [None] * len(files)
    sources = [prepare_file(f, template, max_len, overlong, cache, progress, workers, m, cache_dir)
               for f, m in zip(files, fields)]
    errors = [e for s in sources for e in s.meta["errors"]]
    n_errors = sum(s.meta["n_errors"] for s in sources)
    if errors and strict:
        listed = errors[:MAX_LISTED]
        more = f"\n  ... and {n_errors - len(listed)} more" if n_errors > len(listed) else ""
        raise DataError(f"{n_errors} bad sample(s) (strict: true stops here; strict: false skips them and "
                        f"counts them per reason):\n" + "\n".join(f"  {e}" for e in listed) + more)
    return sources


