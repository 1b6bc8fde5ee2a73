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

import numpy as np

from cnc_jax.torchfile.torch_save import PickleWriter, STORAGE_TYPES, Storages, contiguous_strides

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

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


class _PickleWriter(PickleWriter):
    """The package's writer plus the test-only values listed in the module docstring, and legacy files."""

    def __init__(self, storages: Storages, legacy: bool) -> None:
        super().__init__(storages)
        self._legacy = legacy

    def _save_array(self, obj: np.ndarray) -> None:
        storage = np.ascontiguousarray(obj).reshape(-1)
        self._save_tensor(View(storage, obj.shape, contiguous_strides(obj.shape)), storage_id=obj)

    def _save_other(self, obj: Any) -> None:
        if isinstance(obj, bytes):
            self._save(Call("_codecs", "encode", (obj.decode("latin1"), "latin1")))
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
            self._global("torch", STORAGE_TYPES[storage.dtype])
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
    storages = Storages()
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
    return _PickleWriter(Storages(), legacy=True).dump(obj)


def save_torch_legacy(path: Path | str, obj: Any) -> None:
    """Write `obj` as torch.save(obj, path, _use_new_zipfile_serialization=False) does."""
    Path(path).write_bytes(torch_legacy_bytes(obj))


def torch_legacy_bytes(obj: Any) -> bytes:
    """The bytes torch.save(obj, ..., _use_new_zipfile_serialization=False) writes."""
    storages = Storages()
    main = _PickleWriter(storages, legacy=True).dump(obj)
    keys = sorted(storages.arrays)
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [_plain_pickle(LEGACY_MAGIC_NUMBER), _plain_pickle(LEGACY_PROTOCOL_VERSION), _plain_pickle(sys_info),
             main, _plain_pickle(keys)]
    for key in keys:
        parts.append(struct.pack("<q", storages.arrays[key].size) + storages.data(key))
    return b"".join(parts)
