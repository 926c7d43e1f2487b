"""Reading records: every input file -> ``(line, record | RecordError)``, streamed.

A new input format touches only this module. The preparing side (``data.prepare``) asks for
chunks of records (``record_chunks``) and turns each into raw records in a worker
(``chunk_records`` + ``parse``).

Formats are recognised by content, not by name (``detect``):

  JSON Lines / JSON array   plain, or compressed with gzip, zstd, bzip2 or xz (magic bytes);
                            the layout (array or lines) is decided from the content (``json_layout``)
  Parquet                   ``PAR1``; read row group by row group; a record's place is ROWGROUP:ROW
  Arrow                     the IPC stream files ``datasets``' ``save_to_disk`` writes (and IPC files);
                            a record's place is its ROW; a save_to_disk folder stands for its files

For JSON a record's place is its LINE (for an array: the line where the object starts); rows
are counted from 0, as pyarrow and ``datasets`` count them, lines from 1.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os
import re
import zlib
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------
# formats, recognised by content

COMPRESSION = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


@dataclass(frozen=True)
class Format:
    kind: str                      # json | parquet | arrow-stream | arrow-file
    compression: str | None = None

    def __str__(self) -> str:
        names = {"json": "JSON Lines / JSON array", "parquet": "Parquet", "arrow-stream": "Arrow (IPC stream)",
                 "arrow-file": "Arrow (IPC file)"}
        return names[self.kind] + (f" compressed with {self.compression}" if self.compression else "")


def detect(path: str) -> Format:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return Format("parquet")
    if head.startswith(b"ARROW1"):
        return Format("arrow-file")
    if head.startswith(b"\xff\xff\xff\xff"):
        return Format("arrow-stream")
    for magic, name in COMPRESSION.items():
        if head.startswith(magic):
            return Format("json", name)
    if b"\x00" in head:
        raise DataError(f"{path}: binary content (NUL bytes at its start) that is none of the formats read: JSON Lines "
                        f"or JSON (UTF-8 text, or compressed with gzip, zstd, bzip2 or xz), Parquet, Arrow; give "
                        f"a file in one of them")
    return Format("json")


def load_reader(path: str) -> Format:
    """Import the libraries that read ``path``'s format now (before a worker pool forks, so that the
    workers inherit them instead of each importing them); returns the format."""
    fmt = detect(path)
    if fmt.kind != "json":
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    elif fmt.compression == "zstd":
        import zstandard  # noqa: F401
    return fmt


def unreadable(path: str, fmt: Format, e: BaseException, where: str = "") -> DataError:
    """One line for a file that cannot be decoded: the file, the format tried, what failed."""
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    at = f" at {where}" if where else ""
    return DataError(f"{path}: cannot be read as {fmt}{at} ({why}); check that the file is complete (a copy or "
                     f"download that stopped early) and in one of the formats listed under Data in the README")


# what decoding a damaged file raises, per library
DECODE_ERRORS: tuple = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


def _arrow_errors() -> tuple:
    import pyarrow as pa
    return (pa.ArrowException,)


class _Counted:
    """A binary stream reading through to ``raw``, telling ``read_bytes`` how far ``raw`` got (the
    progress of a compressed file is measured in its own bytes)."""

    def __init__(self, stream, raw, read_bytes):
        self.stream, self.raw, self.read_bytes, self.at = stream, raw, read_bytes, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.read_bytes:
            now = self.raw.tell()
            self.read_bytes(now - self.at)
            self.at = now
        return data

    def __iter__(self):
        return iter(self.stream)


def open_json(path: str, fmt: Format | None = None):
    """A binary stream of the (decompressed) text of a JSON file; close ``.raw`` when done."""
    fmt = fmt or detect(path)
    raw = open(path, "rb")
    if fmt.compression is None:
        stream = raw
    elif fmt.compression == "gzip":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif fmt.compression == "zstd":
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    elif fmt.compression == "bzip2":
        stream = bz2.BZ2File(raw, "rb")
    else:
        stream = lzma.LZMAFile(raw, "rb")
    return stream, raw


def arrow_folder_files(folder: str) -> list[str]:
    """The Arrow files of a folder written by ``datasets``' ``save_to_disk`` (in their order)."""
    state = os.path.join(folder, "state.json")
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        try:
            splits = json.load(open(os.path.join(folder, "dataset_dict.json"))).get("splits", [])
        except (OSError, ValueError):
            splits = []
        raise DataError(f"{folder}: a DatasetDict folder (splits {', '.join(map(str, splits)) or '?'}); name the "
                        f"split's folder, e.g. {os.path.join(folder, str(splits[0]) if splits else 'train')}")
    if not os.path.isfile(state):
        raise DataError(f"{folder}: a folder, and not one written by datasets' save_to_disk (it has no state.json); "
                        f"give the data files, or a glob such as {os.path.join(folder, '*.jsonl')}")
    try:
        with open(state) as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a save_to_disk state file ({e}); write the folder again with save_to_disk")
    return [os.path.join(folder, n) for n in names]


BOM = b"\xef\xbb\xbf"
FIRST_LINE_LIMIT = 16 << 20  # a JSON Lines record longer than this starting with '[' is read as an array
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as the surrogateescape decoder keeps them
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800..\uDFFF escape: maybe a lone surrogate
_SURROGATE_ESCAPE_B = re.compile(rb"\\u[dD][89a-fA-F]")
_STRUCTURE = re.compile(r'["\[\]{},\n]')
_IN_STRING = re.compile(r'["\\\n]')


def json_layout(f) -> str:
    """``"array"`` or ``"lines"``, decided from the content of a binary stream (read from its start).

    A file is a JSON array when its first value opens with ``[`` and is not a whole first line
    followed by more lines: JSON Lines whose first record is an array stays JSON Lines (that record
    is then reported, and every later line is read); content after an array's closing ``]`` is
    reported by the array reader."""
    head = f.read(4096)
    if head.lstrip(BOM + b" \t\r\n")[:1] != b"[":
        return "lines"
    while b"\n" not in head and len(head) < FIRST_LINE_LIMIT:
        block = f.read(1 << 20)
        if not block:
            return "array"
        head += block
    nl = head.find(b"\n")
    if nl < 0:
        return "array"
    rest = head[nl + 1:]
    while not rest.strip():
        rest = f.read(1 << 16)
        if not rest:
            return "array"  # one line: an array, whole
    try:
        json.loads(head[:nl].removeprefix(BOM))
    except RecursionError:
        return "lines"  # a whole line nested too deep to parse: a record of JSON Lines (reported as such)
    except ValueError:
        return "array"  # the first line is not a whole value: an array over several lines
    return "lines"


def iter_records(path: str, read_bytes=None):
    """Yield ``(line, obj | RecordError)`` for every record of a file, in order (any format).

    For a JSON array, ``line`` is where the object starts; for Parquet and Arrow it is the row
    in the file (``location`` names the row group). Nothing is read whole. ``read_bytes(n)`` is
    called with the bytes of the file consumed (progress bars).
    """
    fmt = detect(path)
    if fmt.kind != "json":
        for chunk in _column_chunks(path, fmt, CHUNK, read_bytes):
            yield from chunk_records(path, chunk)
        return
    stream, raw = open_json(path, fmt)
    with raw, stream:
        layout = json_layout(stream)
    stream, raw = open_json(path, fmt)
    with raw, stream:
        counted = _Counted(stream, raw, read_bytes)
        if layout == "array":
            yield from _iter_array(counted, None)
        else:
            yield from _iter_lines(counted, None)


def _iter_lines(f, read_bytes, parsed: bool = True):
    """``(line, record)`` of JSON Lines; with ``parsed=False`` the raw line (a worker parses it)."""
    n, rest = 0, b""
    while True:
        block = f.read(1 << 20)
        if read_bytes:
            read_bytes(len(block))
        if not block:
            lines = [rest] if rest else []
        else:
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
        for raw in lines:
            n += 1
            if n == 1 and raw.startswith(BOM):
                raw = raw[3:]
            if raw.strip():
                yield n, parse(raw) if parsed else raw
        if not block:
            return


def _lone_surrogate(obj) -> RecordError | None:
    """A record whose text holds a lone UTF-16 surrogate (a ``\ud800`` escape with no pair) cannot
    be encoded as UTF-8, so no tokenizer can read it."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("utf-16", "surrogatepass")[2:]
        code = int.from_bytes(bad[:2], "little")
        return RecordError("lone surrogate", f"a string holds a lone UTF-16 surrogate (\\u{code:04x}) that no "
                                             f"UTF-8 text can hold; remove the escape or give its pair")
    return None


def _too_deep() -> RecordError:
    return RecordError("too deeply nested", "nested deeper than the JSON reader allows (Python's recursion limit); "
                                            "flatten the record")


def parse(item):
    """A JSON Lines line (bytes) -> object or RecordError; array records arrive parsed."""
    if not isinstance(item, bytes):
        return item
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError("not UTF-8", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return _too_deep()
    if _SURROGATE_ESCAPE_B.search(item):
        return _lone_surrogate(obj) or obj
    return obj


def _element_end(buf: str, pos: int) -> int | None:
    """Where the array element starting at ``buf[pos]`` ends: the index of the ``,`` or ``]`` at
    its own depth after it, or of a line end inside a string (JSON strings hold no raw line end,
    so the element is broken there). None when ``buf`` ends first. Used to step over a record that
    does not parse, so that only that record is lost (and reported)."""
    depth, i = 0, pos
    while True:
        m = _STRUCTURE.search(buf, i)
        if m is None:
            return None
        c, j = m.group(), m.start()
        if c == '"':
            k = j + 1
            while True:
                s = _IN_STRING.search(buf, k)
                if s is None:
                    return None
                if s.group() == "\\":
                    k = s.start() + 2
                    continue
                if s.group() == "\n":
                    return s.start()
                break
            i = s.start() + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                return j
            depth -= 1
        elif c == "," and depth == 0:
            return j
        i = j + 1


def _iter_array(f, read_bytes, block: int = 1 << 20):
    """Records of a JSON array, streamed through a window of decoded text. Bytes that are not
    UTF-8 are kept (surrogateescape) and cost only the record that holds them; a record that
    does not parse is stepped over (``_element_end``); content after the closing ``]`` is an error."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    jd = json.JSONDecoder()
    buf, pos, line_at_buf, eof = "", 0, 1, False

    def more() -> None:
        nonlocal buf, eof
        raw = f.read(block)
        if read_bytes:
            read_bytes(len(raw))
        buf += dec.decode(raw, final=not raw)
        if not raw:
            eof = True

    def line_of(p: int) -> int:
        return line_at_buf + buf.count("\n", 0, p)

    def skip(p: int, chars: str) -> int:
        """The first position at or after p whose character is not in chars (reading on as needed)."""
        while True:
            while p < len(buf) and buf[p] in chars:
                p += 1
            if p < len(buf) or eof:
                return p
            more()

    more()
    buf = buf.lstrip("\ufeff")
    pos = buf.index("[") + 1
    while True:
        pos = skip(pos, " \t\r\n,")
        if pos >= len(buf):
            yield line_of(pos), RecordError("invalid JSON", "unterminated JSON array (no closing ']')")
            return
        if buf[pos] == "]":
            after = skip(pos + 1, " \t\r\n")
            if after < len(buf):
                yield line_of(after), RecordError(
                    "content after array", "content after the JSON array's closing ']' (on the line of the "
                    "']' or below); a file is one JSON array or JSON Lines (one record per line), not both")
            return
        start_line = line_of(pos)
        while True:
            try:
                obj, end = jd.raw_decode(buf, pos)
                if end == len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                    raise json.JSONDecodeError("number or literal cut at a block end", buf, end)
                item = obj
                if _BAD_BYTE.search(buf, pos, end):
                    item = RecordError("not UTF-8", "not valid UTF-8 (a byte that is not UTF-8 in the record)")
                elif _SURROGATE_ESCAPE.search(buf, pos, end):
                    item = _lone_surrogate(obj) or obj
                break
            except (json.JSONDecodeError, RecursionError) as e:
                end = _element_end(buf, pos)
                if end is None and not eof:
                    more()
                    continue
                end = len(buf) if end is None else end
                if _BAD_BYTE.search(buf, pos, end):
                    item = RecordError("not UTF-8", "not valid UTF-8 (a byte that is not UTF-8 in the record)")
                elif isinstance(e, RecursionError):
                    item = _too_deep()
                else:
                    item = RecordError("invalid JSON", f"invalid JSON ({e.msg} at line {line_of(e.pos)})")
                break
        yield start_line, item
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



@dataclass
class ColumnChunk:
    """Rows of a Parquet or Arrow file: an Arrow record batch (the worker turns it into records)."""
    batch: object             # pyarrow.RecordBatch
    first: int                # row in the file of the batch's first row
    group: int | None = None  # Parquet row group
    group_first: int = 0      # row in the row group of the batch's first row


def location(chunk, line: int) -> str:
    """A record's place in its file: LINE, ROW, or ROWGROUP:ROW (Parquet)."""
    if isinstance(chunk, ColumnChunk) and chunk.group is not None:
        return f"{chunk.group}:{line - chunk.first + chunk.group_first}"
    return str(line)


def chunk_records(path: str, chunk):
    """``(line, raw line | object)`` of a chunk: a byte range of a JSON Lines file (read here,
    in the worker), a list of records a reader already split (array records parsed), or a batch
    of Parquet / Arrow rows."""
    if isinstance(chunk, list):
        yield from chunk
        return
    if isinstance(chunk, ColumnChunk):
        yield from _batch_records(chunk)
        return
    start, end, line = chunk
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(BOM):
        data = data[3:]
    for raw in data.split(b"\n"):
        if raw.strip():
            yield line, raw
        line += 1


def _batch_records(chunk: ColumnChunk):
    try:
        rows = chunk.batch.to_pylist()
    except _arrow_errors() + (UnicodeDecodeError,):  # one bad value: find it row by row
        rows = None
    for i in range(chunk.batch.num_rows):
        if rows is not None:
            yield chunk.first + i, rows[i]
            continue
        try:
            yield chunk.first + i, chunk.batch.slice(i, 1).to_pylist()[0]
        except _arrow_errors() + (UnicodeDecodeError,) as e:
            yield chunk.first + i, RecordError("unreadable row", f"the row cannot be read ({e})")


def _column_chunks(path: str, fmt: Format, max_records: int, read_bytes=None, max_bytes: int | None = None):
    """ColumnChunks of a Parquet file (row group by row group) or an Arrow file."""
    import pyarrow as pa
    max_bytes = max_bytes or CHUNK_BYTES
    errors = _arrow_errors() + DECODE_ERRORS
    size = os.path.getsize(path)
    first, where = 0, ""
    try:
        if fmt.kind == "parquet":
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(path)
            total = max(1, pf.metadata.num_rows)
            for g in range(pf.num_row_groups):
                where, at = f"row group {g}", 0
                meta = pf.metadata.row_group(g)
                per_row = meta.total_byte_size / max(1, meta.num_rows)  # a chunk holds at most ~max_bytes of text
                rows = max(1, min(max_records, int(max_bytes // max(per_row, 1))))
                for batch in pf.iter_batches(batch_size=rows, row_groups=[g], use_threads=False):
                    yield ColumnChunk(batch, first, g, at)
                    if read_bytes:
                        read_bytes(size * (first + batch.num_rows) // total - size * first // total)
                    first += batch.num_rows
                    at += batch.num_rows
            return
        with open(path, "rb") as f:
            if fmt.kind == "arrow-stream":
                batches = iter(pa.ipc.open_stream(f))
            else:
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            done = 0
            for big in batches:
                rows = max(1, min(max_records, int(max_bytes // max(big.nbytes / max(1, big.num_rows), 1))))
                for off in range(0, big.num_rows, rows):
                    where = f"row {first}"
                    batch = big.slice(off, rows)
                    yield ColumnChunk(batch, first)
                    first += batch.num_rows
                if read_bytes:
                    read_bytes(f.tell() - done)
                    done = f.tell()
    except errors as e:
        raise unreadable(path, fmt, e, where) from None


def record_chunks(path: str, read_bytes=None, max_records: int | None = None, max_bytes: int | None = None):
    """Chunks of a file: for plain JSON Lines, ``(start, end, first line)`` byte ranges that end at a
    line end (the worker reads them itself); for a JSON array and compressed JSON Lines, lists of
    records split (array: parsed) here; for Parquet and Arrow, ColumnChunks. A file that cannot be
    decoded raises DataError naming the file and the format tried."""
    max_records = max_records or CHUNK
    max_bytes = max_bytes or CHUNK_BYTES
    fmt = detect(path)
    if fmt.kind != "json":
        yield from _column_chunks(path, fmt, max_records, read_bytes, max_bytes)
        return
    try:
        stream, raw = open_json(path, fmt)
        with raw, stream:
            layout = json_layout(stream)
        if layout == "array" or fmt.compression:
            stream, raw = open_json(path, fmt)
            with raw, stream:
                counted = _Counted(stream, raw, read_bytes)
                records = _iter_array(counted, None) if layout == "array" else _iter_lines(counted, None, parsed=False)
                chunk, size = [], 0
                for line, obj in records:
                    chunk.append((line, obj))
                    size += len(obj) if isinstance(obj, bytes) else 0
                    if len(chunk) >= max_records or size >= max_bytes:
                        yield chunk
                        chunk, size = [], 0
                if chunk:
                    yield chunk
            return
    except DECODE_ERRORS as e:
        if isinstance(e, DataError):
            raise
        raise unreadable(path, fmt, e) from None
    yield from _line_ranges(path, read_bytes, max_records, max_bytes)


def _line_ranges(path: str, read_bytes, max_records: int, max_bytes: int):
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


