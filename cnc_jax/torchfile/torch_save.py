"""Write torch-format checkpoints (what `torch.save` writes, zip format) without torch.

Why it exists: an exported model must load in the official PyTorch code (`torch.load(path, weights_only=True)`),
and nothing at run time may need torch. The pickle is written opcode by opcode (protocol 2, like torch.save);
tensors are `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` over a persistent
id `('storage', torch.<Type>Storage, key, 'cpu', numel)`, the only globals `weights_only` loading needs. The
container is torch's: `<archive>/data.pkl`, `<archive>/data/<key>` (each STORED, its data 64-byte aligned through
an 'FB' padding extra field, as torch's writer does), `byteorder`, `version`, written to the file tensor by tensor.

Values written: None, bool, int, float, str, tuple, list, dict, collections.OrderedDict, numpy arrays (each its
own contiguous storage). Subclasses of `PickleWriter` add more (tests/torch_files.py writes hostile files).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Optional

import ml_dtypes
import numpy as np

STORAGE_TYPES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
ALIGNMENT = 64
_CHUNK = 64 << 20


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


class Storages:
    """Numbers the storages in order of first use (keyed by the identity of their array)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._keys: dict[int, str] = {}

    def key(self, array: np.ndarray) -> str:
        if id(array) not in self._keys:
            key = str(len(self._keys))
            self._keys[id(array)] = key
            self.arrays[key] = array
        return self._keys[id(array)]

    def data(self, key: str) -> bytes:
        array = self.arrays[key]
        return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


class PickleWriter:
    """Protocol-2 pickle bytes for the values listed in the module docstring; tensor data goes to `storages`."""

    def __init__(self, storages: Storages) -> None:
        self._storages = storages
        self._out = bytearray()
        self._memo: dict[tuple[str, str], int] = {}

    def dump(self, obj: Any) -> bytes:
        self._out += pickle.PROTO + b"\x02"
        self._save(obj)
        self._out += pickle.STOP
        return bytes(self._out)

    def _global(self, module: str, name: str) -> None:
        """GLOBAL, memoised like pickle does (BINPUT the first time, BINGET afterwards)."""
        index = self._memo.get((module, name))
        if index is not None:
            short = index < 256
            self._out += pickle.BINGET + bytes([index]) if short else pickle.LONG_BINGET + struct.pack("<I", index)
            return
        self._out += pickle.GLOBAL + f"{module}\n{name}\n".encode()
        index = self._memo[(module, name)] = len(self._memo)
        self._out += pickle.BINPUT + bytes([index]) if index < 256 else pickle.LONG_BINPUT + struct.pack("<I", index)

    def _save(self, obj: Any) -> None:
        if obj is None:
            self._out += pickle.NONE
        elif isinstance(obj, bool):
            self._out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif isinstance(obj, int):
            self._out += encode_int(obj)
        elif isinstance(obj, float):
            self._out += pickle.BINFLOAT + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            self._out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, list):
            self._out += pickle.EMPTY_LIST
            self._save_items(pickle.APPENDS, obj)
        elif isinstance(obj, OrderedDict):
            self._save_ordered_dict(obj)
        elif isinstance(obj, dict):
            self._out += pickle.EMPTY_DICT
            self._save_items(pickle.SETITEMS, [part for item in obj.items() for part in item])
        elif isinstance(obj, np.ndarray):
            self._save_array(obj)
        else:
            self._save_other(obj)

    def _save_other(self, obj: Any) -> None:
        raise TypeError(f"cannot write {type(obj).__name__}")

    def _save_tuple(self, items: tuple) -> None:
        if not items:
            self._out += pickle.EMPTY_TUPLE
            return
        if len(items) > 3:
            self._out += pickle.MARK
        for item in items:
            self._save(item)
        self._out += {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items), pickle.TUPLE)

    def _save_items(self, opcode: bytes, parts: list) -> None:
        """MARK parts... APPENDS/SETITEMS onto the object on the stack (nothing when empty)."""
        if parts:
            self._out += pickle.MARK
            for part in parts:
                self._save(part)
            self._out += opcode

    def _save_ordered_dict(self, mapping: OrderedDict) -> None:
        self._global("collections", "OrderedDict")
        self._out += pickle.EMPTY_TUPLE + pickle.REDUCE
        self._save_items(pickle.SETITEMS, [part for item in mapping.items() for part in item])
        if vars(mapping):
            self._save(dict(vars(mapping)))
            self._out += pickle.BUILD

    def _save_array(self, array: np.ndarray) -> None:
        """A contiguous tensor with a storage of its own: _rebuild_tensor_v2(storage, 0, shape, stride, False, {})."""
        if array.dtype not in STORAGE_TYPES:
            raise ValueError(f"dtype {array.dtype} has no torch storage type")
        key = self._storages.key(array)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self._out += pickle.MARK
        self._out += pickle.MARK
        self._save("storage")
        self._global("torch", STORAGE_TYPES[array.dtype])
        self._save(key)
        self._save("cpu")
        self._save(int(array.size))
        self._out += pickle.TUPLE + pickle.BINPERSID
        self._save(0)
        self._save(tuple(int(s) for s in array.shape))
        self._save(contiguous_strides(array.shape))
        self._save(False)
        self._save(OrderedDict())
        self._out += pickle.TUPLE + pickle.REDUCE


def _write_entry(archive: zipfile.ZipFile, name: str, chunks, size: int) -> None:
    """One STORED entry whose data starts on a 64-byte boundary (an 'FB' padding extra field, as torch writes)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    zip64 = size > 0xFFFFFFFF - (1 << 20)
    header = 30 + len(name.encode()) + (20 if zip64 else 0)
    offset = archive.fp.tell()
    padding = -(offset + header + 4) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as out:
        for chunk in chunks:
            out.write(chunk)


def _array_chunks(array: np.ndarray):
    flat = np.ascontiguousarray(array).reshape(-1)
    flat = flat.astype(flat.dtype.newbyteorder("<"), copy=False)
    step = max(_CHUNK // max(flat.itemsize, 1), 1)
    for begin in range(0, flat.size, step):
        yield flat[begin:begin + step].tobytes()


def write_torch_zip(file: BinaryIO, obj: Any, archive_name: str = "archive",
                    on_tensor: Optional[Callable[[int], None]] = None, writer=PickleWriter) -> None:
    """torch.save(obj, file) to an open binary file; `on_tensor(nbytes)` is called after each storage."""
    storages = Storages()
    pickled = writer(storages).dump(obj)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        entries = [("data.pkl", pickled), (".format_version", b"1"), (".storage_alignment", b"64"),
                   ("byteorder", b"little")]
        for name, payload in entries:
            _write_entry(archive, f"{archive_name}/{name}", [payload], len(payload))
        for key, array in storages.arrays.items():
            _write_entry(archive, f"{archive_name}/data/{key}", _array_chunks(array), array.nbytes)
            if on_tensor:
                on_tensor(array.nbytes)
        for name, payload in (("version", b"3\n"), (".data/serialization_id", b"0" * 40)):
            _write_entry(archive, f"{archive_name}/{name}", [payload], len(payload))


def save_torch(path: str, obj: Any, on_tensor: Optional[Callable[[int], None]] = None) -> None:
    """torch.save(obj, path); the archive is named after the file, as torch names it."""
    archive_name = os.path.splitext(os.path.basename(path))[0] or "archive"
    with open(path, "wb") as f:
        write_torch_zip(f, obj, archive_name, on_tensor)


def torch_bytes(obj: Any, archive_name: str = "archive") -> bytes:
    """The bytes torch.save writes for `obj` (e.g. the official dataset's CLIP-embedding `.pt` files)."""
    buffer = io.BytesIO()
    write_torch_zip(buffer, obj, archive_name)
    return buffer.getvalue()
