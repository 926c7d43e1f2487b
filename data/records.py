"""Reading records: every input file -> ``(line, record | RecordError)``, streamed.

A new input format touches only this module. The preparing side (``data.prepare``) asks for
chunks of records (``record_chunks``) and turns each into raw records in a worker
(``chunk_records`` + ``parse``).
"""
from __future__ import annotations

import codecs
import json
import re

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
    except (ValueError, RecursionError):
        return "array"  # the first line is not a whole value: an array over several lines
    return "lines"


def iter_records(path: str, read_bytes=None):
    """Yield ``(line, obj | RecordError)`` for a JSON array or JSON Lines file.

    For a JSON array, ``line`` is where the object starts.  Neither form is read whole:
    JSON Lines goes line by line, an array through a growing window of decoded text.
    ``read_bytes(n)`` is called with the bytes consumed (progress bars).
    """
    with open(path, "rb") as f:
        layout = json_layout(f)
        f.seek(0)
        if layout == "array":
            yield from _iter_array(f, read_bytes)
        else:
            yield from _iter_lines(f, read_bytes)


def _iter_lines(f, read_bytes):
    for n, raw in enumerate(f, 1):
        if read_bytes:
            read_bytes(len(raw))
        if n == 1 and raw.startswith(BOM):
            raw = raw[3:]
        if raw.strip():
            yield n, parse(raw)


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
        layout = json_layout(f)
    if layout == "array":
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


