"""Reading records: every input file -> ``(line, record | RecordError)``, streamed.

A new input format touches only this module. The preparing side (``data.prepare``) asks for
chunks of records (``record_chunks``) and turns each into raw records in a worker
(``chunk_records`` + ``parse``).
"""
from __future__ import annotations

import codecs
import json

from ppllm.errors import UserError

CHUNK = 4096          # records rendered and tokenized per batch (at most)
CHUNK_BYTES = 2 << 20  # ... and at most this much raw text per batch (one task of the worker pool)


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



def parse(item):
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


def chunk_records(path: str, chunk):
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



def record_chunks(path: str, read_bytes=None, max_records: int | None = None, max_bytes: int | None = None):
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


