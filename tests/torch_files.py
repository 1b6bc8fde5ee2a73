"""Test helper (not a test module): writes torch-format checkpoint files without torch.

Why it exists: the checkpoint reader must be tested on files with features the reference files lack
(bfloat16, views sharing a storage, storage offsets, scalars, v3 tensors, Lightning wrappers with
class instances) and on hostile files whose pickle would call `os.system` if unpickled naively.
The pickle bytes are written opcode by opcode (protocol 2, like torch.save), and the containers
mirror torch's: the zip format (entries under `<name>/`, STORED, data 64-byte aligned through an
'FB' extra field in the local header only, data descriptors after each entry) and the legacy format
(magic number, protocol version, sys info, main pickle, key list, then count + bytes per storage).

Values `save_torch_zip` / `save_torch_legacy` accept (nested freely):
  None, bool, int, float, str, bytes, tuple, list, dict, collections.OrderedDict (its attributes,
  e.g. `_metadata`, are written with BUILD like torch state dicts), numpy arrays (a tensor with its
  own storage; the same array object twice shares the storage), `View`, `Parameter`, `Call`,
  `Global`, and `Raw` opcode snippets.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_TYPES = {
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
# dtypes torch >= 2 saves with _rebuild_tensor_v3 over an UntypedStorage.
_V3_DTYPES = {np.dtype(np.uint16): "uint16", np.dtype(np.uint32): "uint32", np.dtype(np.uint64): "uint64"}


@dataclass(frozen=True)
class Call:
    """`module.name(*args)` written as GLOBAL + args tuple + REDUCE (or NEWOBJ when `newobj`), then
    optionally APPENDS `listitems`, SETITEMS `dictitems` and BUILD `state` — what pickle writes for
    arbitrary objects. A naive unpickler would import and call `module.name`."""

    module: str
    name: str
    args: tuple = ()
    newobj: bool = False
    state: Any = None
    listitems: tuple = ()
    dictitems: tuple[tuple[Any, Any], ...] = ()


@dataclass(frozen=True)
class Global:
    """A bare reference to `module.name` (GLOBAL opcode only)."""

    module: str
    name: str


@dataclass(frozen=True)
class Raw:
    """Pickle opcodes inserted verbatim; they must push exactly one object."""

    opcodes: bytes


@dataclass(frozen=True, eq=False)
class View:
    """A tensor viewing the 1-D `storage` array (shared by identity) with torch's geometry.
    `storage_slice` = (offset, size): legacy files only, the storage is itself a view of `storage`."""

    storage: np.ndarray
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    storage_slice: Optional[tuple[int, int]] = None


@dataclass(frozen=True, eq=False)
class Parameter:
    """An nn.Parameter: written as torch._utils._rebuild_parameter(tensor, True, OrderedDict())."""

    data: Any


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _Storages:
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


def _encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


class _PickleWriter:
    """Protocol-2 pickle bytes for the values listed in the module docstring."""

    def __init__(self, storages: _Storages, legacy: bool) -> None:
        self._storages = storages
        self._legacy = legacy
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
            self._out += _encode_int(obj)
        elif isinstance(obj, float):
            self._out += pickle.BINFLOAT + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            self._out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data
        elif isinstance(obj, bytes):
            self._save(Call("_codecs", "encode", (obj.decode("latin1"), "latin1")))
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
            storage = np.ascontiguousarray(obj).reshape(-1)
            self._save_tensor(View(storage, obj.shape, contiguous_strides(obj.shape)), storage_id=obj)
        elif isinstance(obj, View):
            self._save_tensor(obj, storage_id=obj.storage)
        elif isinstance(obj, Parameter):
            self._save(Call("torch._utils", "_rebuild_parameter", (obj.data, True, OrderedDict())))
        elif isinstance(obj, Call):
            self._save_call(obj)
        elif isinstance(obj, Global):
            self._global(obj.module, obj.name)
        elif isinstance(obj, Raw):
            self._out += obj.opcodes
        else:
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

    def _save_call(self, call: Call) -> None:
        self._global(call.module, call.name)
        self._save(tuple(call.args))
        self._out += pickle.NEWOBJ if call.newobj else pickle.REDUCE
        self._save_items(pickle.APPENDS, list(call.listitems))
        self._save_items(pickle.SETITEMS, [part for item in call.dictitems for part in item])
        if call.state is not None:
            self._save(call.state)
            self._out += pickle.BUILD

    def _save_tensor(self, view: View, storage_id: np.ndarray) -> None:
        """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()) — or
        _v3(..., dtype) over an UntypedStorage for the dtypes torch >= 2 stores that way."""
        key = self._storages.key(storage_id)
        dtype = view.storage.dtype
        v3_dtype = _V3_DTYPES.get(dtype)
        if v3_dtype is not None and self._legacy:
            raise ValueError(f"legacy torch files cannot hold {dtype}")
        self._global("torch._utils", "_rebuild_tensor_v3" if v3_dtype else "_rebuild_tensor_v2")
        self._out += pickle.MARK
        self._persistent_id(view, key, v3_dtype is not None)
        self._save(view.offset)
        self._save(tuple(view.shape))
        self._save(tuple(view.stride))
        self._save(False)
        self._save(OrderedDict())
        if v3_dtype:
            self._global("torch", v3_dtype)
        self._out += pickle.TUPLE + pickle.REDUCE

    def _persistent_id(self, view: View, key: str, untyped: bool) -> None:
        storage = view.storage
        self._out += pickle.MARK
        self._save("storage")
        if untyped:
            self._global("torch", "UntypedStorage")
        else:
            self._global("torch", _STORAGE_TYPES[storage.dtype])
        self._save(key)
        self._save("cpu")
        self._save(storage.nbytes if untyped else storage.size)
        if self._legacy:
            slice_ = view.storage_slice
            self._save(None if slice_ is None else (f"{key}_view_{slice_[0]}", slice_[0], slice_[1]))
        elif view.storage_slice is not None:
            raise ValueError("storage slices only exist in legacy files")
        self._out += pickle.TUPLE + pickle.BINPERSID


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


def zip_archive(entries: list[tuple[str, bytes]], compressed: bool = False) -> bytes:
    """A zip laid out like torch's PyTorchStreamWriter: local headers with sizes in a trailing data
    descriptor, an 'FB' extra field padding each entry's data to 64 bytes (local header only)."""
    out = bytearray()
    central = bytearray()
    method = 8 if compressed else 0
    for name, data in entries:
        name_bytes = name.encode("utf-8")
        payload = zlib.compress(data)[2:-4] if compressed else data
        crc = zlib.crc32(data)
        header_offset = len(out)
        padding = -(header_offset + 30 + len(name_bytes) + 4) % 64
        extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x0808, method, 0, 0, 0, 0, 0, len(name_bytes), len(extra))
        out += name_bytes + extra + payload
        out += struct.pack("<IIII", 0x08074B50, crc, len(payload), len(data))
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x0808, method, 0, 0, crc, len(payload), len(data),
            len(name_bytes), 0, 0, 0, 0, 0, header_offset,
        )
        central += name_bytes
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + end)


def torch_zip_entries(root: str, pickled: bytes, storages: dict[str, bytes], byteorder: str = "little") -> list:
    """The (name, bytes) records of a torch zip file holding the pickle `pickled`, in torch's order."""
    return [
        (f"{root}/data.pkl", pickled),
        (f"{root}/.format_version", b"1"),
        (f"{root}/.storage_alignment", b"64"),
        (f"{root}/byteorder", byteorder.encode()),
        *((f"{root}/data/{key}", data) for key, data in storages.items()),
        (f"{root}/version", b"3\n"),
        (f"{root}/.data/serialization_id", b"0" * 40),
    ]


def torch_zip_bytes(obj: Any, *, root: str = "archive", byteorder: str = "little", compressed: bool = False) -> bytes:
    """The bytes torch.save(obj, ...) writes (zip format, torch >= 1.6)."""
    storages = _Storages()
    pickled = _PickleWriter(storages, legacy=False).dump(obj)
    data = {key: storages.data(key) for key in storages.arrays}
    return zip_archive(torch_zip_entries(root, pickled, data, byteorder), compressed)


def save_torch_zip(
    path: Path | str, obj: Any, *, byteorder: str = "little", compressed: bool = False
) -> None:
    """Write `obj` as torch.save(obj, path) does (zip format, torch >= 1.6)."""
    path = Path(path)
    path.write_bytes(torch_zip_bytes(obj, root=path.stem, byteorder=byteorder, compressed=compressed))


def _plain_pickle(obj: Any) -> bytes:
    return _PickleWriter(_Storages(), legacy=True).dump(obj)


def save_torch_legacy(path: Path | str, obj: Any) -> None:
    """Write `obj` as torch.save(obj, path, _use_new_zipfile_serialization=False) does."""
    Path(path).write_bytes(torch_legacy_bytes(obj))


def torch_legacy_bytes(obj: Any) -> bytes:
    """The bytes torch.save(obj, ..., _use_new_zipfile_serialization=False) writes."""
    storages = _Storages()
    main = _PickleWriter(storages, legacy=True).dump(obj)
    keys = sorted(storages.arrays)
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [_plain_pickle(LEGACY_MAGIC_NUMBER), _plain_pickle(LEGACY_PROTOCOL_VERSION), _plain_pickle(sys_info),
             main, _plain_pickle(keys)]
    for key in keys:
        parts.append(struct.pack("<q", storages.arrays[key].size) + storages.data(key))
    return b"".join(parts)
