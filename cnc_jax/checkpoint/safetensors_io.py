"""Reader (lazy, memory-mapped) and small writer of `.safetensors` files, with numpy only.

Why it exists: HF-style weights (CLIP, DPT, converted CnC checkpoints) ship as safetensors; we read
them without the `safetensors` package, into the same `LazyTensor`s as the torch reader. The writer
exists for tests and for exporting converted weights.

Format: an 8-byte little-endian u64 header size N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the data buffer that follows the header), then the data buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from cnc_jax.checkpoint.errors import CheckpointError, PathLike, reading
from cnc_jax.checkpoint.tensor import LazyTensor, MappedFile, Storage

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"


def _read_header(path: PathLike) -> tuple[dict[str, Any], int]:
    """The JSON header and the file offset of the data buffer."""
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) != 8:
            raise CheckpointError("too short for a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"safetensors header size {header_size} is impossible for a {file_size}-byte file")
        header = json.loads(file.read(header_size).decode("utf-8"))
    if not isinstance(header, dict):
        raise CheckpointError("the safetensors header is not a JSON object")
    return header, 8 + header_size


def _tensor(name: str, entry: Any, source: MappedFile, data_start: int) -> LazyTensor:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor '{name}' has an invalid or unsupported header entry {entry!r}")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise CheckpointError(f"tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"tensor '{name}': data_offsets {offsets} do not fit shape {shape} of {entry['dtype']}")
    return LazyTensor(Storage(name, dtype, end - begin, source, data_start + begin), dtype, shape)


def load_safetensors(path: PathLike, *, lazy: bool = True) -> dict[str, LazyTensor]:
    """All tensors of a safetensors file, by name (`__metadata__` is not a tensor and is skipped)."""
    with reading(path):
        header, data_start = _read_header(path)
        source = MappedFile(path)
        tensors = {
            name: _tensor(name, entry, source, data_start) for name, entry in header.items() if name != METADATA_KEY
        }
        if not lazy:
            for tensor in tensors.values():
                tensor.storage.load_into_memory()
    return tensors


def save_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None
) -> None:
    """Write `tensors` (numpy arrays, any supported dtype) as a safetensors file."""
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    buffers = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        code = _DTYPE_CODES.get(array.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"tensor '{name}': dtype {array.dtype} has no safetensors code")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        buffers.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for data in buffers:
            file.write(data)
