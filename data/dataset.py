"""Sample files -> tokenized documents (cached) -> packed rows -> a continuous stream of steps.

1. ``prepare_file`` streams one JSON array / JSON Lines file in chunks through a pool of
   worker processes (every core; results are written in file order, a few chunks in flight,
   so memory does not grow with the corpus). A worker validates each record, renders it with
   the template and tokenizes it. A ``pretrain`` document longer than ``max_seq_len`` becomes
   consecutive windows that together train every token once (``split_windows``); other
   samples are truncated at a turn boundary or dropped (``overlong``). The result goes beside
   the data in ``.ppllm-cache/``: flat int32 ``tokens``/``labels`` files plus per-document
   offsets. The cache is keyed by the file's path, size and mtime, the tokenizer's content
   hash, the template, ``max_seq_len`` and ``overlong``; one process builds it (under a file
   lock), the others memory-map it.
2. ``build_rows`` mixes the sources (optional weights), shuffles documents by seed and
   packs them best-fit into rows of ``max_seq_len`` (or one per row with ``packing: false``).
   Only the row plan (document indices) is held in memory.
3. ``StepLoader`` turns the rows into an endless stream of epochs (one seeded permutation each)
   and cuts it into optimizer steps, each data-parallel rank taking its disjoint share of every
   step; a step that reaches the end of an epoch is completed from the next one, so no row is
   dropped. ``one_pass`` walks every row once (evaluation), padding the last step.

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
import socket
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ppllm.errors import UserError

from .samples import SAMPLE_TYPES, SampleError, check, parts_for
from .templates import Target, Template, encode_parts

CACHE_VERSION = 2
CHUNK = 4096          # records rendered and tokenized per batch (at most)
CHUNK_BYTES = 2 << 20  # ... and at most this much raw text per batch (one task of the worker pool)
POOL_MIN_BYTES = 4 << 20  # smaller files are tokenized in the calling process (no pool start-up)
MAX_LISTED = 1000     # strict mode lists at most this many errors


class DataError(UserError):
    """Bad or unusable data: the message names the file (and line) and the fix."""


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


def _init_worker(template: Template, max_len: int, overlong: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism: one thread per worker
    if hasattr(template.tok, "threads"):
        template.tok.threads = 1
    gc.disable()  # millions of small int lists make the cyclic GC rescan them over and over; none form cycles
    _WORKER.update(template=template, max_len=max_len, overlong=overlong,
                   frame=pretrain_frame(template) if FAST_PRETRAIN else None)


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


def _parse(item):
    """A JSON Lines line (bytes) -> object or RecordError; array records arrive parsed."""
    if not isinstance(item, bytes):
        return item
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError("not UTF-8", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")


def _chunk_records(path: str, chunk):
    """``(line, raw line | object)`` of a chunk: a byte range of a JSON Lines file (read here,
    in the worker) or a list of records an array reader already parsed."""
    if isinstance(chunk, list):
        yield from chunk
        return
    start, end, line = chunk
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for raw in data.split(b"\n"):
        if raw.strip():
            yield line, raw
        line += 1


def _chunk_work(path: str, chunk) -> dict:
    """Validate, render, tokenize and fit one chunk of records."""
    template, max_len, overlong = _WORKER["template"], _WORKER["max_len"], _WORKER["overlong"]
    out = {k: 0 for k in _COUNTERS}
    out.update(samples={}, skipped={}, errors=[])
    frame = _WORKER.get("frame")
    good, parts, fast, texts = [], [], [], []
    for line, item in _chunk_records(path, chunk):
        out["records"] += 1
        obj = _parse(item)
        if isinstance(obj, RecordError):
            reason, message = obj.reason, obj.message
        else:
            try:
                kind, payload = check(obj)
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
            out["errors"].append(f"{path}:{line}: {message}")
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


def _record_chunks(path: str, read_bytes=None, max_records: int | None = None, max_bytes: int | None = None):
    """Chunks of a file: for JSON Lines, ``(start, end, first line)`` byte ranges that end at a line
    end (the worker reads them itself); for a JSON array, lists of records parsed here."""
    max_records = max_records or CHUNK
    max_bytes = max_bytes or CHUNK_BYTES
    with open(path, "rb") as f:
        first = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        chunk = []
        for line, obj in iter_records(path, read_bytes):
            chunk.append((line, obj))
            if len(chunk) >= max_records:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    with open(path, "rb") as f:
        start, line, buf, eof = 0, 1, b"", False
        while True:
            cut, k, pos = -1, 0, 0  # the last of at most max_records line ends in buf
            while k < max_records:
                nxt = buf.find(b"\n", pos)
                if nxt < 0:
                    break
                cut, k, pos = nxt, k + 1, nxt + 1
            if cut >= 0 and (k == max_records or len(buf) >= max_bytes or eof):
                yield start, start + cut + 1, line
                start, line, buf = start + cut + 1, line + k, buf[cut + 1:]
                continue
            if eof:
                if buf.strip():
                    yield start, start + len(buf), line
                return
            block = f.read(max_bytes)
            eof = not block
            buf += block
            if read_bytes:
                read_bytes(len(block))


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


def _prepare_into(path: str, template: Template, max_len: int, overlong: str, tok_f, lab_f, progress: bool,
                  workers: int | None = None):
    """Stream ``path`` through the workers in order; tokens/labels go to the files as chunks finish,
    so memory stays at a few chunks per worker whatever the corpus size."""
    meta = _new_meta(path)
    offsets, kinds, lines, trained = array.array("q", [0]), array.array("B"), array.array("i"), array.array("i")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"data {os.path.basename(path)}",
                   disable=not sys.stderr.isatty(), leave=False)

    def consume(r: dict) -> None:
        for k in _COUNTERS:
            meta[k] += r[k]
        for name in ("samples", "skipped"):
            for k, v in r[name].items():
                meta[name][k] = meta[name].get(k, 0) + v
        meta["errors"] += r["errors"][:MAX_LISTED - len(meta["errors"])]
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
    chunks = _record_chunks(path, bar.update if bar else None)
    if n_workers == 1:
        saved = dict(_WORKER)
        enabled = gc.isenabled()
        _init_worker_inline(template, max_len, overlong)
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
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=(template, max_len, overlong)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_chunk_work, (path, chunk)))
                while len(pending) >= 2 * n_workers:  # bounded read-ahead, results in file order
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
    if bar:
        bar.close()
    meta["tokens"] = int(offsets[-1])
    meta["trained_tokens"] = int(np.asarray(trained, dtype=np.int64).sum()) if len(trained) else 0
    arrays = {"offsets": np.frombuffer(offsets, dtype=np.int64).copy(),
              "kinds": np.frombuffer(kinds, dtype=np.uint8).copy(),
              "lines": np.frombuffer(lines, dtype=np.int32).copy(),
              "trained": np.frombuffer(trained, dtype=np.int32).copy()}
    return meta, arrays


def _init_worker_inline(template: Template, max_len: int, overlong: str) -> None:
    gc.disable()
    _WORKER.update(template=template, max_len=max_len, overlong=overlong,
                   frame=pretrain_frame(template) if FAST_PRETRAIN else None)


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


def cache_folder(path: str, template: Template, max_len: int, overlong: str = "truncate") -> str:
    """Where the prepared form of ``path`` lives (it is current when ``meta.json`` is there)."""
    return os.path.join(_cache_root(path), f"{os.path.basename(path)}.{_cache_key(path, template, max_len, overlong)}")


def prepare_file(path: str, template: Template, max_len: int, overlong: str = "truncate", cache: bool = True,
                 progress: bool = False, workers: int | None = None) -> Source:
    """The prepared documents of one file, from the cache when it is current.

    ``workers`` tokenizing processes (default: every core for a file of 4 MB or more)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    if not cache:
        import io
        tok_f, lab_f = io.BytesIO(), io.BytesIO()
        meta, arrays = _prepare_into(path, template, max_len, overlong, tok_f, lab_f, progress, workers)
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
            rank = f" on rank {os.environ['RANK']}" if "RANK" in os.environ else ""
            print(f"data: preparing {path} ({os.path.getsize(path) / 1e6:.1f} MB) with "
                  f"{prepare_workers(path, workers)} tokenizing process(es){rank}; cache {folder}", flush=True)
            os.makedirs(tmp)
            with open(os.path.join(tmp, "tokens.bin"), "wb") as tf, open(os.path.join(tmp, "labels.bin"), "wb") as lf:
                meta, arrays = _prepare_into(path, template, max_len, overlong, tf, lf, progress, workers)
            meta["prepared_by"] = {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK")}
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
                 strict: bool = True, cache: bool = True, progress: bool = False,
                 workers: int | None = None) -> list[Source]:
    """Prepare every file; in strict mode any bad sample stops here with all of them listed."""
    if not files:
        raise DataError("no data files given")
    sources = [prepare_file(f, template, max_len, overlong, cache, progress, workers) for f in files]
    errors = [e for s in sources for e in s.meta["errors"]]
    n_errors = sum(s.meta["n_errors"] for s in sources)
    if errors and strict:
        listed = errors[:MAX_LISTED]
        more = f"\n  ... and {n_errors - len(listed)} more" if n_errors > len(listed) else ""
        raise DataError(f"{n_errors} bad sample(s) (strict: true stops here; strict: false skips them and "
                        f"counts them per reason):\n" + "\n".join(f"  {e}" for e in listed) + more)
    return sources


def build_rows(files: list[str], template: Template, max_len: int, packing: bool = True,
               overlong: str = "truncate", seed: int = 0, strict: bool = True, weights: list[float] | None = None,
               cache: bool = True, progress: bool = False, workers: int | None = None) -> tuple[PackedRows, DataStats]:
    sources = load_sources(files, template, max_len, overlong, strict, cache, progress, workers)
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


# ----------------------------------------------------------------------------------------
# the step stream


def total_steps(rows: int, rows_per_step: int, passes: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a run: ``passes`` over ``rows`` rows, ``rows_per_step`` at a time, the
    last step completed from the next pass; capped by ``max_steps``."""
    steps = -(-passes * rows // rows_per_step)
    return min(steps, max_steps) if max_steps else steps


class StepLoader:
    """Deterministic, data-parallel-sharded, continuous stream of optimizer steps.

    The rows form one endless stream: epoch e is a permutation of all rows drawn from
    ``seed + e``, and the epochs follow one another. Step k takes the stream's rows
    ``[k * per_step, (k + 1) * per_step)``, where ``per_step = micro_batch * grad_accum * dp_size``,
    so a step that reaches the end of an epoch completes itself from the next epoch's shuffle:
    no row is dropped and any number of rows (at least one) trains. Within a step, data-parallel
    rank r takes every dp_size-th row starting at r, so the ranks' rows are disjoint within an
    epoch and every rank runs the same steps with the same shapes.

    Each step is a list of ``grad_accum`` micro-batches ``((ids, pos, doc), labels)``; rows are
    assembled only when used. ``rows`` is a PackedRows or a dict of equally long [rows, seq] arrays.
    The position (``state_dict``) is the number of stream rows consumed: resume is exact.
    ``one_pass`` walks every row once, in order, for evaluation.
    """

    has_data = True

    def __init__(self, rows, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
                 pad_id: int | None = None):
        self.rows = rows
        self.mbs, self.gas = micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.n = len(rows) if isinstance(rows, PackedRows) else len(rows["input_ids"])
        if self.n == 0:
            raise DataError("no rows of data to train on")
        self.pad_id = pad_id if pad_id is not None else (rows.pad_id if isinstance(rows, PackedRows) else 0)
        self.per_step = micro_batch * grad_accum * dp_size
        self._position = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over the rows (the last one partly from the next pass)."""
        return total_steps(self.n, self.per_step, 1)

    def steps(self, passes: int, max_steps: int | None = None) -> int:
        return total_steps(self.n, self.per_step, passes, max_steps)

    @property
    def epoch(self) -> int:
        """The epoch the next step starts in."""
        return self._position // self.n

    def state_dict(self) -> dict:
        return {"position": self._position, "rows": self.n, "per_step": self.per_step}

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state:  # checkpoints written before the continuous stream
            state = {"position": state["epoch"] * self.n + state["step_in_epoch"] * self.per_step, "rows": self.n}
        pos = int(state["position"])
        if state.get("rows", self.n) != self.n:
            # other data than the checkpoint's: start over at the same epoch of the new rows
            pos = pos // int(state["rows"]) * self.n
        self._position = pos

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step spans at most a few epochs; keep the recent ones
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._orders[epoch]

    def stream(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions ``start .. start + count``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // self.n).tolist():
            sel = pos // self.n == e
            out[sel] = self._order(e)[pos[sel] % self.n]
        return out

    def _fetch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx``; an index of -1 is a padding row (pad ids, nothing trained, doc -1)."""
        real = idx >= 0
        if isinstance(self.rows, PackedRows):
            got = self.rows.get(idx[real])
        else:
            got = {name: np.asarray(arr[idx[real]]) for name, arr in self.rows.items()}
        if real.all():
            return got
        fill = {"input_ids": self.pad_id, "labels": -100, "position_ids": 0, "doc_ids": -1}
        out = {}
        for name, arr in got.items():
            full = np.full((len(idx),) + arr.shape[1:], fill.get(name, 0), dtype=arr.dtype)
            full[real] = arr
            out[name] = full
        return out

    def _batches(self, idx: np.ndarray) -> list:
        """This rank's micro-batches of one step whose stream rows are ``idx`` (per_step of them)."""
        mine = idx[self.dp_rank::self.dp_size]
        batches = []
        for m in range(self.gas):
            rows = self._fetch(mine[m * self.mbs:(m + 1) * self.mbs])
            t = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in rows.items()}
            batches.append(((t["input_ids"], t["position_ids"], t["doc_ids"]), t["labels"]))
        return batches

    def next_step(self) -> list:
        idx = self.stream(self._position, self.per_step)
        self._position += self.per_step
        return self._batches(idx)

    @property
    def eval_steps(self) -> int:
        return total_steps(self.n, self.per_step, 1)

    def one_pass(self):
        """Every row exactly once, in row order; the last step is filled with padding rows
        (all labels -100: no tokens, no loss). Does not move the training position."""
        for k in range(self.eval_steps):
            idx = np.arange(k * self.per_step, (k + 1) * self.per_step, dtype=np.int64)
            idx[idx >= self.n] = -1
            yield self._batches(idx)


def trained_tokens(batches: list) -> int:
    return int(sum((labels != -100).sum() for _, labels in batches))
