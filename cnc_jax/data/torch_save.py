"""Write one tensor as `torch.save(tensor, path)` does, without torch.

Why: the official dataset stores CLIP embeddings as torch `.pt` files (data/get_primitives.py), and our
prepare step and synthetic generator must write files that torch and our reader both load. Only what that
needs is here: one contiguous little-endian tensor in the zip format (torch >= 1.6), the pickle written
opcode by opcode (protocol 2, as torch), each entry STORED with its data 64-byte aligned like torch's
writer (an 'FB' padding extra field).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage"}
_ALIGNMENT = 64


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tensor_pickle(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage '0', offset 0, shape, contiguous stride, False, OrderedDict())."""
    numel = int(np.prod(shape, dtype=np.int64))
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= max(size, 1)
    storage = _tuple([_str("storage"), _global("torch", _STORAGE_TYPES[dtype]), _str("0"), _str("cpu"), _int(numel)])
    args = _tuple([storage + pickle.BINPERSID, _int(0), _tuple([_int(s) for s in shape]),
                   _tuple([_int(s) for s in strides]), pickle.NEWFALSE,
                   _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE])
    return pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE + pickle.STOP


def tensor_file_bytes(array: np.ndarray, archive_name: str = "archive") -> bytes:
    """The bytes torch.save writes for `array` as a tensor (zip format)."""
    array = np.asarray(array)
    if array.dtype not in _STORAGE_TYPES:
        raise ValueError(f"cannot write dtype {array.dtype} (supported: {', '.join(map(str, _STORAGE_TYPES))})")
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    entries = [("data.pkl", _tensor_pickle(array.shape, array.dtype)), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", b"little"), ("data/0", data), ("version", b"3\n"),
               (".data/serialization_id", b"0" * 40)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in entries:
            info = zipfile.ZipInfo(f"{archive_name}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            header = 30 + len(info.filename.encode())
            padding = -(buffer.tell() + header + 4) % _ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            archive.writestr(info, payload)
    return buffer.getvalue()


def save_tensor(path: str, array: np.ndarray) -> None:
    """torch.save(torch.from_numpy(array), path); the archive is named after the file, as torch names it."""
    archive_name = os.path.splitext(os.path.basename(path))[0] or "archive"
    with open(path, "wb") as f:
        f.write(tensor_file_bytes(array, archive_name))
