"""Lazy tensors: torch's (storage, storage_offset, shape, stride) view model over bytes in a file.

Why it exists: real checkpoints are large (SD-1.5 `v1-5-pruned.ckpt` is 7.7 GB, ~1100 tensors), so
the readers only record *where* each tensor's bytes are (a `Storage`: a byte range of a
memory-mapped file) and copy them into numpy when `LazyTensor.numpy()` is called. Several tensors
may view one storage (torch views: transposes, slices, expands with stride 0).

`Storage` and `LazyTensor` are reachable from a checkpoint's pickle (it receives them as values),
so they refuse pickle's BUILD opcode: a hostile file cannot rewrite their geometry after validation.
A view is checked against its storage when it is made, before any byte is read: every element it
touches must lie inside the storage, and a view with more elements than its storage (stride 0, overlapping
strides) may not materialise more than MAX_EXPANDED_BYTES — one stored float could otherwise ask for
terabytes.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any, Optional, Sequence

import numpy as np
import safetensors
from numpy.lib.stride_tricks import as_strided

from cnc_jax.torchfile.errors import CheckpointError, PathLike, short_repr

MAX_DIMS = 64  # numpy's limit (torch's too)
MAX_EXPANDED_BYTES = 256 << 20
_MAX_INDEX = 2**63  # sizes, strides and offsets are int64 in torch and numpy


class SealedAgainstPickleState:
    """Mixin: pickle's BUILD opcode (which would set attributes) is refused on these objects."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(f"the pickle tried to modify {type(self).__name__}; refused")


class ByteSource:
    """Somewhere storage bytes live; counts the bytes handed out so laziness can be checked."""

    size: int

    def __init__(self) -> None:
        self.bytes_read = 0

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """`nbytes` bytes starting at `offset`, as a read-only uint8 array (a view where possible)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointError(f"byte range [{offset}, {offset + nbytes}) is outside the data ({self.size} bytes)")
        self.bytes_read += nbytes
        return self._read(offset, nbytes)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        raise NotImplementedError


class MappedFile(ByteSource):
    """A whole file, memory-mapped read-only: pages are only read when a tensor is materialised."""

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)
        with open(self.path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._map)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=offset)

    def __reduce__(self) -> tuple:
        return (MappedFile, (self.path,))


class SafetensorsEntry(ByteSource):
    """One tensor of a safetensors file, read by the `safetensors` package when it is materialised.

    The handle (`safe_open(..., framework="numpy")`, which memory-maps the file) is shared by the file's
    entries; a copy or unpickled entry opens the file again.
    """

    def __init__(self, path: PathLike, name: str, size: int, handle: Any = None) -> None:
        super().__init__()
        self.path, self.name, self.size = os.fspath(path), name, size
        self._handle = handle

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        if self._handle is None:
            self._handle = safetensors.safe_open(self.path, framework="numpy")
        data = np.ascontiguousarray(self._handle.get_tensor(self.name)).reshape(-1).view(np.uint8)
        if data.size != self.size:
            raise CheckpointError(f"tensor '{self.name}' holds {data.size} bytes, its header says {self.size}")
        return data[offset : offset + nbytes]

    def __reduce__(self) -> tuple:
        return (SafetensorsEntry, (self.path, self.name, self.size))


class InMemoryBytes(ByteSource):
    """Bytes already in memory (eager loading, decompressed zip entries)."""

    def __init__(self, data: np.ndarray) -> None:
        super().__init__()
        self._data = np.asarray(data, dtype=np.uint8).reshape(-1)
        self._data.flags.writeable = False
        self.size = self._data.size

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        return self._data[offset : offset + nbytes]


class Storage(SealedAgainstPickleState):
    """A run of `nbytes` bytes of element type `dtype` (torch's typed storage), viewed by tensors.

    `source` is None while a reader has not yet located the bytes (legacy files list the data after
    the pickle); readers call `place` once they know where the bytes are.
    """

    __slots__ = ("key", "dtype", "nbytes", "source", "offset")

    def __init__(
        self, key: str, dtype: np.dtype, nbytes: int, source: Optional[ByteSource] = None, offset: int = 0
    ) -> None:
        self.key = key
        self.dtype = np.dtype(dtype)
        self.nbytes = nbytes
        self.source: Optional[ByteSource] = None
        self.offset = 0
        if source is not None:
            self.place(source, offset)

    def place(self, source: ByteSource, offset: int) -> None:
        """Say where the bytes are; they must lie inside `source`."""
        if offset < 0 or offset + self.nbytes > source.size:
            raise CheckpointError(
                f"storage '{self.key}' needs bytes [{offset}, {offset + self.nbytes}) "
                f"but the data holds only {source.size}"
            )
        self.source = source
        self.offset = offset

    def read(self) -> np.ndarray:
        """The storage's bytes as a read-only uint8 array."""
        if self.source is None:
            raise CheckpointError(f"storage '{self.key}' has no data")
        return self.source.read(self.offset, self.nbytes)

    def load_into_memory(self) -> None:
        """Copy the bytes out of the file now (eager loading)."""
        self.place(InMemoryBytes(self.read().copy()), 0)

    def __reduce__(self) -> tuple:
        return (Storage, (self.key, self.dtype, self.nbytes, self.source, self.offset))

    def __repr__(self) -> str:
        return f"Storage(key={self.key!r}, dtype={self.dtype}, nbytes={self.nbytes})"


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements, of a tensor of `shape`."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def is_index(value: Any) -> bool:
    """A non-negative int64 (bools are ints to Python, never sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INDEX


def _dims(values: Any, what: str) -> tuple[int, ...]:
    """`values` as a tuple of at most MAX_DIMS non-negative int64s, or a CheckpointError."""
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS or not all(map(is_index, values)):
        raise CheckpointError(f"invalid tensor {what} {short_repr(values)}")
    return tuple(values)


def _check_extent(shape: tuple[int, ...], stride: tuple[int, ...], offset: int, capacity: int, key: str) -> None:
    """Every element the view touches must lie inside the storage (`capacity` elements)."""
    if len(stride) != len(shape):
        raise CheckpointError(f"tensor shape {shape} and stride {stride} have different lengths")
    if math.prod(shape) == 0:
        return
    needed = offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1
    if needed > capacity:
        raise CheckpointError(
            f"tensor view (offset {offset}, shape {shape}, stride {stride}) needs {needed} elements "
            f"but storage '{key}' holds only {capacity}"
        )


def _check_expansion(shape: tuple[int, ...], itemsize: int, capacity: int, key: str) -> None:
    """A view repeating its storage's elements (stride 0, overlaps) may not materialise unbounded copies."""
    size = math.prod(shape)
    if size > capacity and size * itemsize > MAX_EXPANDED_BYTES:
        raise CheckpointError(
            f"tensor view of shape {shape} repeats the {capacity} elements of storage '{key}' into "
            f"{size * itemsize} bytes; refusing more than {MAX_EXPANDED_BYTES}"
        )


class LazyTensor(SealedAgainstPickleState):
    """A tensor whose bytes stay in the file until `numpy()`; `shape`, `dtype`, `stride` are free."""

    __slots__ = ("storage", "dtype", "shape", "stride", "storage_offset")

    def __init__(
        self,
        storage: Storage,
        dtype: np.dtype,
        shape: Sequence[int],
        stride: Optional[Sequence[int]] = None,
        storage_offset: int = 0,
    ) -> None:
        self.storage = storage
        self.dtype = np.dtype(dtype)
        self.shape = _dims(shape, "shape")
        self.stride = contiguous_strides(self.shape) if stride is None else _dims(stride, "stride")
        if not is_index(storage_offset):
            raise CheckpointError(f"invalid tensor storage offset {short_repr(storage_offset)}")
        self.storage_offset = storage_offset
        capacity = storage.nbytes // self.dtype.itemsize
        _check_extent(self.shape, self.stride, storage_offset, capacity, storage.key)
        _check_expansion(self.shape, self.dtype.itemsize, capacity, storage.key)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """A fresh, writable, C-contiguous copy of the tensor's values in its stored dtype."""
        itemsize = self.dtype.itemsize
        raw = self.storage.read()
        capacity = raw.size // itemsize
        _check_extent(self.shape, self.stride, self.storage_offset, capacity, self.storage.key)
        if self.size == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        stored_dtype = self.dtype.newbyteorder("<")  # files are little-endian whatever the host is
        elements = raw[: capacity * itemsize].view(stored_dtype)[self.storage_offset :]
        # a dimension of size 1 never steps: its stride may be anything, numpy's must fit an int64
        strides = [step * itemsize if size > 1 else 0 for size, step in zip(self.shape, self.stride)]
        view = as_strided(elements, shape=self.shape, strides=strides, writeable=False)
        return np.array(view, dtype=self.dtype, order="C")

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a LazyTensor's values are always copied out of the file")
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __reduce__(self) -> tuple:
        return (LazyTensor, (self.storage, self.dtype, self.shape, self.stride, self.storage_offset))

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, storage={self.storage.key!r})"
