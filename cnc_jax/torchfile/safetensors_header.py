"""The bounds check of a `.safetensors` header, run before the `safetensors` package opens the file.

Why it exists: the tensors are read by the `safetensors` package (`state_dict.load_safetensors`, lazily
through `safe_open`); its own header errors name neither the file nor, often, the tensor ("incomplete
metadata, file not fully covered"), and a header with more than numpy's 64 dimensions passes it and fails
later inside numpy. This check gives one CheckpointError naming the tensor and what is wrong with it.

Format: an 8-byte little-endian u64 header size N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the data buffer that follows the header), then the data buffer. `read_header`
checks the whole header against the file before any tensor byte is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from cnc_jax.torchfile.errors import CheckpointError, PathLike, short_repr
from cnc_jax.torchfile.tensor import MAX_DIMS, is_index

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),  # the F8 codes are missing: safetensors' numpy reader refuses them
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
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"


def _refuse_constant(name: str) -> None:
    raise CheckpointError(f"the safetensors header holds {name}, which is not JSON")


def _entry(name: str, entry: Any) -> tuple[np.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked as the safetensors package does."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise CheckpointError(f"tensor '{name}' has an invalid header entry {short_repr(entry)}")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"tensor '{name}' has an unsupported dtype {short_repr(entry['dtype'])}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(is_index, shape)):
        raise CheckpointError(f"tensor '{name}' has an invalid shape {short_repr(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_index, offsets))):
        raise CheckpointError(f"tensor '{name}' has invalid data_offsets {short_repr(offsets)}")
    begin, end = offsets
    if begin > end or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"tensor '{name}': data_offsets {offsets} do not fit shape {shape} of {entry['dtype']}")
    return dtype, shape, begin, end


def _check_metadata(metadata: Any) -> None:
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise CheckpointError(f"the safetensors {METADATA_KEY} is not a map of strings: {short_repr(metadata)}")


def _check_tiling(entries: dict[str, tuple], buffer_size: int) -> None:
    """The tensors must cover the data buffer exactly, in order, without gaps or overlaps."""
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise CheckpointError(f"tensor '{name}' starts at byte {begin} of the data, the one before ends at "
                                  f"{position}")
        position = end
    if position != buffer_size:
        raise CheckpointError(f"the tensors cover {position} bytes of the {buffer_size}-byte data buffer")


def read_header(path: PathLike) -> tuple[dict[str, tuple[np.dtype, list[int], int, int]], int]:
    """{name: (dtype, shape, begin, end)} of a safetensors file and the file offset of its data buffer.

    Everything is checked before any tensor byte is read (and before the `safetensors` package sees the
    file): header size within the file and MAX_HEADER_BYTES, plain JSON (no NaN or
    Infinity), dtypes, shapes of at most MAX_DIMS int64 sizes, offsets that fit the shapes and tile the
    data buffer exactly, string metadata.
    """
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) != 8:
            raise CheckpointError("too short for a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"safetensors header size {header_size} is impossible for a {file_size}-byte file")
        header = json.loads(file.read(header_size).decode("utf-8"), parse_constant=_refuse_constant)
    if not isinstance(header, dict):
        raise CheckpointError("the safetensors header is not a JSON object")
    _check_metadata(header.pop(METADATA_KEY, None))
    entries = {name: _entry(name, entry) for name, entry in header.items()}
    _check_tiling(entries, file_size - 8 - header_size)
    return entries, 8 + header_size
