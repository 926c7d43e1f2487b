"""Tensor files as byte ranges: safetensors and torch's zip format, read and written without
holding tensors in memory.

The converter's work is mostly copying bytes: a tensor's bytes in a safetensors shard are the
same bytes a layer file stores, so ``hg_to_pp``/``pp_to_hg`` plan every output tensor from the
files' headers (:func:`safetensors_index`, :func:`torch_zip_index`) and copy each one from file to
file in the kernel (``os.copy_file_range``), with no mapping and no copy in the process. A tensor
that needs a cast or a computation (``--dtype``, a LoRA merge, fused-tensor transforms) is
passed as an in-memory ``torch.Tensor`` instead.

The layer files written here are torch's own zip format, record for record (``data.pkl``,
``byteorder``, ``data/<n>``, ``version``, 64-byte aligned storages), so ``torch.load``
(``weights_only=True``, with or without ``mmap``) and DeepSpeed's ``load_state_dir`` read them.
The one difference from ``torch.save``: the CRC-32 fields of the tensor records are 0, as with
``torch.serialization.set_crc32_options(False)`` (torch does not check them; computing them
would mean reading every byte into the process).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
STORAGE_NAMES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
                 torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                 torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
                 torch.bool: "BoolStorage"}
_STORAGE_DTYPES = {v: k for k, v in STORAGE_NAMES.items()}
ALIGN = 64  # torch aligns every storage record to 64 bytes
_ZIP32_LIMIT = 0xFFFFFFFF - (1 << 20)


@dataclass(frozen=True)
class Stored:
    """A tensor's bytes inside a file: ``nbytes`` at ``offset`` of ``path``, C-contiguous."""
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple

    def load(self) -> torch.Tensor:
        """The tensor itself (read into memory; for the paths that compute on it)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = bytearray(self.nbytes)
            f.readinto(buf)
        if not self.nbytes:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class Lazy:
    """A tensor computed when it is written (a cast, a LoRA merge, a tensor of a file read by torch)."""
    dtype: torch.dtype
    shape: tuple
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def payload_meta(p) -> tuple[torch.dtype, tuple, int]:
    """(dtype, shape, bytes) of a payload: a Stored, a Lazy or a torch.Tensor."""
    if isinstance(p, (Stored, Lazy)):
        return p.dtype, tuple(p.shape), p.nbytes
    return p.dtype, tuple(p.shape), p.numel() * p.element_size()


# ---------------------------------------------------------------------------------------------
# reading


class DamagedFile(ValueError):
    """A tensor file whose header or layout does not fit the file: truncated, corrupted, not that format."""


# safetensors' own reader refuses headers above 100 MB; a length beyond that (or beyond the file) is damage
ST_HEADER_LIMIT = 100 * 10 ** 6


def safetensors_index(path: str) -> dict[str, Stored]:
    """Every tensor of a safetensors file, from its header alone; the header is checked against the
    file's size (DamagedFile naming the file otherwise), so no tensor is read past the end."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(ST_HEADER_LIMIT, size - 8):
            raise DamagedFile(f"{path}: its header length is {n} bytes but the file has {size - 8} after it"
                              + (" (safetensors allows at most 100 MB)" if n > ST_HEADER_LIMIT else ""))
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedFile(f"{path}: its header is not valid JSON ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:120]})") from None
    if not isinstance(header, dict):
        raise DamagedFile(f"{path}: its header is a JSON {type(header).__name__}, not an object")
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, end, *shape)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise DamagedFile(f"{path}: tensor {key!r} has no valid dtype, shape and data_offsets in the header "
                              f"({json.dumps(info)[:120]})") from None
        if dtype_name not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype_name}, which ppllm does not convert")
        nbytes = math.prod(shape) * ST_DTYPES[dtype_name].itemsize
        if end - start != nbytes:
            raise DamagedFile(f"{path}: tensor {key!r} has data_offsets [{start}, {end}], {end - start} bytes, but "
                              f"{dtype_name} {list(shape)} is {nbytes} bytes")
        if base + end > size:
            raise DamagedFile(f"{path}: tensor {key!r} ends at byte {base + end} but the file has {size} bytes "
                              f"(truncated?)")
        out[key] = Stored(path, base + start, nbytes, ST_DTYPES[dtype_name], shape)
    return out


class _NotPlain(Exception):
    """A torch file this reader does not map to byte ranges (the caller falls back to torch.load)."""


class _StorageInfo:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorInfo:
    def __init__(self, storage: _StorageInfo, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _contiguous_stride(size: tuple) -> tuple:
    stride, acc = [], 1
    for d in reversed(size):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def _rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _TensorInfo(storage, offset, size, stride)


class _IndexUnpickler(pickle.Unpickler):
    """Reads a torch ``data.pkl`` into _TensorInfo records; only a state dict's globals are known."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _NotPlain(repr(pid)[:80])
        return _StorageInfo(str(pid[2]), pid[1].dtype, int(pid[4]))


def torch_zip_index(path: str) -> dict[str, Stored] | None:
    """Every tensor of a torch zip file (``torch.save`` of a flat ``{name: tensor}``) as byte ranges,
    or None when the file is something else (legacy format, views, other objects)."""
    if not zipfile.is_zipfile(path):
        return None
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                return None
            prefix = pkl[: -len("data.pkl")]
            if prefix + "byteorder" in infos and z.read(prefix + "byteorder") != sys.byteorder.encode():
                return None
            state = _IndexUnpickler(z.open(pkl)).load()
        if not isinstance(state, dict):
            return None
        out = {}
        with open(path, "rb") as f:
            for key, t in state.items():
                if not isinstance(key, str) or not isinstance(t, _TensorInfo):
                    return None
                st = t.storage
                numel = math.prod(t.size)
                if t.offset != 0 or numel != st.numel or (numel > 1 and t.stride != _contiguous_stride(t.size)):
                    return None
                info = infos.get(f"{prefix}data/{st.key}")
                nbytes = numel * st.dtype.itemsize
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                    return None
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise DamagedFile(f"{path}: the zip record of tensor {key!r} is damaged")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                at = info.header_offset + 30 + name_len + extra_len
                if at + nbytes > size:
                    raise DamagedFile(f"{path}: tensor {key!r} ends at byte {at + nbytes} but the file has "
                                      f"{size} bytes (truncated?)")
                out[key] = Stored(path, at, nbytes, st.dtype, t.size)
        return out
    except DamagedFile:
        raise
    except (_NotPlain, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# writing


def _copy_range(src_fd: int, offset: int, nbytes: int, dst_fd: int) -> None:
    """nbytes from src at offset to dst's current position, inside the kernel where it can."""
    done = 0
    while done < nbytes:
        n = 0
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
        except OSError:
            n = 0
        if n <= 0:  # not supported here (or across these file systems): plain reads and writes
            os.lseek(src_fd, offset + done, os.SEEK_SET)
            while done < nbytes:
                chunk = os.read(src_fd, min(16 << 20, nbytes - done))
                if not chunk:
                    raise OSError(f"unexpected end of file while copying {nbytes} bytes at {offset}")
                view = memoryview(chunk)
                while view:  # a short write (a filling disk) must not drop bytes
                    view = view[os.write(dst_fd, view):]
                done += len(chunk)
            return
        done += n


class _Writer:
    """Appends to one open file; tensor payloads are copied from their source files."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self._sources: dict[str, int] = {}

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.pos += n
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None

    def payload(self, p) -> None:
        try:
            self._payload(p)
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, self.path) from None

    def _payload(self, p) -> None:
        if isinstance(p, Stored):
            if p.path not in self._sources:
                self._sources[p.path] = os.open(p.path, os.O_RDONLY)
            _copy_range(self._sources[p.path], p.offset, p.nbytes, self.fd)
            self.pos += p.nbytes
            os.lseek(self.fd, self.pos, os.SEEK_SET)
        else:
            want = payload_meta(p)
            t = (p.make() if isinstance(p, Lazy) else p).detach().contiguous().cpu()
            if (t.dtype, tuple(t.shape)) != want[:2]:
                raise ValueError(f"a tensor came out as {t.dtype} {list(t.shape)}, planned {want[0]} {list(want[1])}")
            if t.numel():
                self.write(t.reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        os.close(self.fd)


def write_safetensors(path: str, items: list[tuple[str, object]], metadata: dict | None = None) -> None:
    """A safetensors file from (name, payload) pairs, in that order: header first (known from the
    payloads' dtypes and shapes), then each tensor's bytes."""
    if sys.byteorder != "little":
        raise ValueError("safetensors output needs a little-endian machine")
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, p in items:
        dtype, shape, nbytes = payload_meta(p)
        header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    w = _Writer(path)
    try:
        w.write(struct.pack("<Q", len(blob)) + blob)
        for _, p in items:
            w.payload(p)
    finally:
        w.close()


class _TensorRef:
    """Pickles as torch pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage_key: str, dtype: torch.dtype, shape: tuple):
        self.storage = _StorageRef(storage_key, dtype, math.prod(shape))
        self.shape = tuple(shape)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, _contiguous_stride(self.shape), False, OrderedDict()))


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _StatePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _zip_header(name: bytes, size: int, data_at: int, crc: int) -> tuple[bytes, bytes]:
    """(local header with padding so that the data starts at an ALIGN boundary, its extra field)."""
    fixed = 30 + len(name)
    pad = -(data_at + fixed + 4) % ALIGN  # the extra field's own 4-byte header
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding field, as torch writes
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x800, 0, 0, 0x21, crc, size, size, len(name), len(extra))
    return local + name + extra, extra


def write_torch_state(path: str, items: list[tuple[str, object]]) -> None:
    """``torch.save({name: tensor})``'s file from (name, payload) pairs, streaming every payload."""
    total = sum(payload_meta(p)[2] for _, p in items)
    if total > _ZIP32_LIMIT:  # beyond plain zip offsets: let torch write zip64
        torch.save({k: (p.load() if isinstance(p, Stored) else p.make() if isinstance(p, Lazy) else p)
                    for k, p in items}, path)
        return
    state = {key: _TensorRef(str(i), payload_meta(p)[0], payload_meta(p)[1]) for i, (key, p) in enumerate(items)}
    import io
    buf = io.BytesIO()
    _StatePickler(buf, protocol=2).dump(state)
    prefix = os.path.splitext(os.path.basename(path))[0].encode() or b"archive"
    records: list[tuple[bytes, object]] = [(b"data.pkl", buf.getvalue()), (b".format_version", b"1"),
                                           (b".storage_alignment", str(ALIGN).encode()), (b"byteorder", b"little")]
    records += [(f"data/{i}".encode(), p) for i, (_, p) in enumerate(items)]
    records += [(b"version", b"3\n")]
    w = _Writer(path)
    central = []
    try:
        for name, data in records:
            full = prefix + b"/" + name
            size = payload_meta(data)[2] if not isinstance(data, bytes) else len(data)
            header_at = w.pos
            crc = zlib.crc32(data) if isinstance(data, bytes) else 0  # tensor bytes: see the module notes
            local, extra = _zip_header(full, size, header_at, crc)
            w.write(local)
            if isinstance(data, bytes):
                w.write(data)
            else:
                w.payload(data)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x800, 0, 0, 0x21, crc, size, size,
                                       len(full), len(extra), 0, 0, 0, 0, header_at) + full + extra)
        cd_at = w.pos
        cd = b"".join(central)
        w.write(cd)
        w.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(cd), cd_at, 0))
    finally:
        w.close()
