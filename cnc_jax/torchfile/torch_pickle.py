"""Safe, torch-free reader of PyTorch checkpoint files (.ckpt / .pth / .pt / .bin).

Why it exists: `torch.load` needs torch and, unless `weights_only`, executes whatever the file's
pickle names (GLOBAL os system + REDUCE runs `os.system`). Here `RestrictedUnpickler.find_class`
never imports anything: it returns either one of our own harmless rebuild functions / markers
(allow-list below) or an inert `Opaque` placeholder class that records the arguments and state the
pickle gives it. Lightning checkpoints (optimizer states, callbacks, hyper-parameter objects) thus
load, with placeholders where the classes would be, and nothing from the file is ever executed.

File formats:
  zip (torch >= 1.6): entries `<root>/data.pkl` (protocol-2 pickle), `<root>/data/<key>` (raw
      little-endian bytes of each storage; STORED, 64-byte aligned via an extra field that only the
      *local* header carries), `<root>/byteorder`, `<root>/version`, `<root>/.format_version`,
      `<root>/.storage_alignment`, `<root>/.data/serialization_id`. Persistent ids are
      ('storage', <storage type>, key, location, numel).
  legacy (torch < 1.6): pickles of the magic number, the protocol version (1001) and a sys-info
      dict, then the main pickle with persistent ids ('storage', <storage type>, root_key,
      location, numel, view_metadata), then a pickle of the storage-key list, then for each listed
      key an int64 element count followed by the raw bytes.
Tensors come back as `LazyTensor`s over a memory map of the file.

Hostile sizes: every pickle is checked by `pickle_scan.check_pickle` before it is unpickled (memo
indices, frames, lengths and nesting bounded by what the stream holds), and zip records are read only up
to the sizes the file can hold (stored: its bytes; deflated: at most MAX_DEFLATE_RATIO times them).
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, ClassVar, Optional

import ml_dtypes
import numpy as np

from cnc_jax.torchfile.errors import CheckpointError, PathLike, reading, short_repr
from cnc_jax.torchfile.pickle_scan import check_pickle
from cnc_jax.torchfile.tensor import (
    ByteSource,
    LazyTensor,
    MappedFile,
    SealedAgainstPickleState,
    Storage,
)

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
MAX_DEFLATE_RATIO = 1032  # the most deflate can expand its input
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _call_repr(qualname: str, args: tuple) -> str:
    """`os.system('touch x')`, bounded."""
    shown = ", ".join(short_repr(arg) for arg in args[:4])
    return f"{qualname}({shown}{', ...' if len(args) > 4 else ''})"


# --------------------------------------------------------------------------------------------
# Placeholders for everything we refuse to import
# --------------------------------------------------------------------------------------------


class _OpaqueMeta(type):
    def __repr__(cls) -> str:
        return f"<refused global {cls.qualname}>"


class Opaque(metaclass=_OpaqueMeta):
    """Inert stand-in for an object the pickle wanted built from a refused global.

    Records everything the pickle does to it (REDUCE / NEWOBJ / NEWOBJ_EX / INST / OBJ arguments,
    BUILD state, APPENDS / ADDITEMS items, SETITEMS entries) and executes nothing.
    """

    qualname: ClassVar[str] = "<opaque>"
    args: tuple
    kwargs: dict
    state: Any
    items: list
    entries: list

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        placeholder = super().__new__(cls)
        placeholder.args = args
        placeholder.kwargs = kwargs
        placeholder.state = None
        placeholder.items = []
        placeholder.entries = []
        return placeholder

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """REDUCE calls the class; the arguments were already recorded by `__new__`."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries.append((key, value))

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def add(self, item: Any) -> None:
        self.items.append(item)

    def __reduce__(self) -> tuple:
        return (_restore_opaque, (self.qualname, self.args, self.kwargs, self.state, self.items, self.entries))

    def __repr__(self) -> str:
        return f"<refused {_call_repr(self.qualname, self.args)}>"


@functools.lru_cache(maxsize=4096)
def opaque_type(qualname: str) -> type[Opaque]:
    """The placeholder class standing for the global `qualname` (one class per name)."""
    short_name = qualname.rpartition(".")[2] or qualname
    return _OpaqueMeta(short_name, (Opaque,), {"qualname": qualname, "__module__": __name__})


def _restore_opaque(qualname: str, args: tuple, kwargs: dict, state: Any, items: list, entries: list) -> Opaque:
    """Rebuild a placeholder (used when placeholders are copied or pickled)."""
    cls = opaque_type(qualname)
    placeholder = cls.__new__(cls, *args, **kwargs)
    placeholder.state = state
    placeholder.items = items
    placeholder.entries = entries
    return placeholder


def describe(value: Any) -> str:
    """What `value` is, for error messages; placeholders say which refused global they stand for."""
    if isinstance(value, Opaque):
        return f"a call to {_call_repr(value.qualname, value.args)}"
    if isinstance(value, _OpaqueMeta):
        return f"a reference to {value.qualname}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def is_refused_global(value: Any) -> bool:
    """Whether `value` is a placeholder for (a call to, or a bare reference to) a refused global."""
    return isinstance(value, (Opaque, _OpaqueMeta))


# --------------------------------------------------------------------------------------------
# The allow-list: our own harmless implementations of the globals torch files use
# --------------------------------------------------------------------------------------------


class _DTypeMarker(SealedAgainstPickleState):
    """A named torch dtype stand-in: only carries the numpy element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageType(_DTypeMarker):
    """Marker for `torch.FloatStorage` & co. in persistent ids."""

    __slots__ = ()


class TorchDType(_DTypeMarker):
    """Marker for `torch.float32` & co. (the dtype argument of `_rebuild_tensor_v3`)."""

    __slots__ = ()


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,  # torch >= 2 (v3 tensors): numel counts bytes
}

_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


def _storage_of(value: Any) -> Storage:
    if not isinstance(value, Storage):
        raise CheckpointError(f"a tensor was to be built from {describe(value)} instead of a storage")
    return value


def _refuse_tensor_metadata(metadata: Any) -> None:
    """torch only writes metadata for conjugate / negative-bit views, which we do not emulate."""
    if metadata and (not isinstance(metadata, dict) or any(metadata.values())):
        raise CheckpointError(f"unsupported tensor metadata {short_repr(metadata)} (conjugate/negative views)")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> LazyTensor:
    """torch._utils._rebuild_tensor: a view of a typed storage."""
    storage = _storage_of(storage)
    return LazyTensor(storage, storage.dtype, size, stride, storage_offset)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    """torch._utils._rebuild_tensor_v2; requires_grad and backward_hooks are irrelevant here."""
    _refuse_tensor_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> LazyTensor:
    """torch._utils._rebuild_tensor_v3 (torch >= 2, e.g. uint16/uint32): an untyped storage + dtype."""
    _refuse_tensor_metadata(metadata)
    if not isinstance(dtype, TorchDType):
        raise CheckpointError(f"unsupported tensor dtype {describe(dtype)}")
    return LazyTensor(_storage_of(storage), dtype.dtype, size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    """torch._utils._rebuild_parameter: an nn.Parameter is just its data here."""
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    """torch._utils._rebuild_parameter_with_state: the Python attributes of the Parameter are dropped."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2 (tensor subclasses): `func` came from `find_class`, so it
    is one of our rebuilders or a placeholder; the subclass and its attributes are dropped."""
    return func(*args)


def _device(*args: Any) -> str:
    """torch.device('cuda', 0) -> 'cuda:0' (devices are irrelevant: everything is read to numpy)."""
    if not all(isinstance(arg, (str, int)) for arg in args):
        raise CheckpointError(f"invalid torch.device arguments {short_repr(args)}")
    return ":".join(str(arg) for arg in args)


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """_codecs.encode as protocol-2 pickles use it for `bytes` objects: encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing _codecs.encode{short_repr((text, encoding))}")
    return text.encode("latin1")


class AllowedCallable(SealedAgainstPickleState):
    """One of our functions as `find_class` hands it out. A plain function would let pickle's BUILD
    set its attributes (e.g. `__defaults__`), changing it for every later load in the process."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __repr__(self) -> str:
        return f"<allowed {self.function.__name__}>"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> what `find_class` returns: sealed markers, immutable builtin types, and
    our own functions wrapped in `AllowedCallable`."""
    functions = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "device"): _device,
        ("_codecs", "encode"): _latin1_bytes,
    }
    allowed: dict[tuple[str, str], Any] = {key: AllowedCallable(function) for key, function in functions.items()}
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("torch", "Size")] = tuple
    for module in ("builtins", "__builtin__"):
        for name, value in (("set", set), ("frozenset", frozenset), ("slice", slice), ("complex", complex)):
            allowed[(module, name)] = value
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[(module, name)] = StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = TorchDType(name, dtype)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: allow-listed globals map to our own code, the rest to
    `Opaque` placeholders. Persistent ids must be ('storage', ...) records, handed to `load_storage`."""

    def __init__(self, file: BinaryIO, load_storage: Optional[Callable[[tuple], Storage]] = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        return allowed if allowed is not None else opaque_type(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Storage:
        if self._load_storage is None or not isinstance(pid, tuple) or not pid or _text(pid[0]) != "storage":
            raise CheckpointError(
                f"refusing persistent id {short_repr(pid)}: only ('storage', ...) records are allowed here"
            )
        return self._load_storage(pid[1:])


def restricted_load(
    stream: BinaryIO, size: int, load_storage: Optional[Callable[[tuple], Storage]] = None
) -> Any:
    """Unpickle the pickle at the stream's position (of `size` bytes in all) once `check_pickle` found
    nothing in it out of proportion to the stream; the C unpickler sees exactly its bytes. Leaves the
    stream just after the pickle."""
    start = stream.tell()
    end = check_pickle(stream, size)
    stream.seek(start)
    pickled = stream.read(end - start)
    return RestrictedUnpickler(io.BytesIO(pickled), load_storage).load()


# --------------------------------------------------------------------------------------------
# Small validators for persistent-id fields
# --------------------------------------------------------------------------------------------


def _text(value: Any) -> Optional[str]:
    """A str (py2-era files may hold ASCII bytes), or None."""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return value if isinstance(value, str) else None


def _fields(record: Any, count: int, what: str) -> tuple:
    if not isinstance(record, tuple) or len(record) != count:
        raise CheckpointError(f"malformed {what} {short_repr(record)}")
    return record


def _key(value: Any) -> str:
    key = _text(value)
    if key is None:
        raise CheckpointError(f"invalid storage key {short_repr(value)}")
    return key


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"invalid element count {short_repr(value)}")
    return value


def _storage_dtype(storage_type: Any) -> np.dtype:
    if not isinstance(storage_type, StorageType):
        raise CheckpointError(f"unsupported storage type {describe(storage_type)}")
    return storage_type.dtype


# --------------------------------------------------------------------------------------------
# Zip format (torch >= 1.6)
# --------------------------------------------------------------------------------------------


def _check_record(info: zipfile.ZipInfo, archive_size: int) -> None:
    """A record may only claim the bytes the file can hold (else zipfile would allocate what it claims)."""
    name = info.filename
    if info.compress_type not in _ZIP_METHODS:
        raise CheckpointError(f"record '{name}' uses compression method {info.compress_type}; only stored and "
                              "deflated records are read")
    if info.header_offset + info.compress_size > archive_size:
        raise CheckpointError(f"record '{name}' claims {info.compress_size} bytes at offset {info.header_offset} "
                              f"of a {archive_size}-byte file")
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.file_size > (info.compress_size if stored else MAX_DEFLATE_RATIO * info.compress_size):
        raise CheckpointError(f"record '{name}' claims its {info.compress_size} bytes expand to {info.file_size}")


def _read_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> bytes:
    """A record's bytes, read no further than the size it claims (checked against the file first)."""
    _check_record(info, archive_size)
    with archive.open(info) as record:
        return record.read(info.file_size)


class ZipMemberSource(ByteSource):
    """A compressed zip entry (torch never writes these, other tools may): decompressed on read."""

    def __init__(self, path: PathLike, member: str, size: int) -> None:
        super().__init__()
        self.path = path
        self.member = member
        self.size = size

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        with reading(self.path), open(self.path, "rb") as file, zipfile.ZipFile(file) as archive:
            data = _read_record(archive, archive.getinfo(self.member), os.fstat(file.fileno()).st_size)
        return np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)


def _archive_root(archive: zipfile.ZipFile) -> str:
    suffix = "/data.pkl"
    roots = [name[: -len(suffix)] for name in archive.namelist() if name.endswith(suffix) and name.count("/") == 1]
    if len(roots) != 1:
        found = "no" if not roots else f"{len(roots)}"
        raise CheckpointError(f"a zip with {found} '<name>/data.pkl' records: not a torch zip checkpoint")
    return roots[0]


def _check_byteorder(archive: zipfile.ZipFile, root: str, archive_size: int) -> None:
    """Files without a byteorder record predate it and are little-endian."""
    info = archive.NameToInfo.get(f"{root}/byteorder")
    if info is not None:
        order = _read_record(archive, info, archive_size).decode("ascii", errors="replace").strip()
        if order != "little":
            raise CheckpointError(f"storages are stored {order!r}-endian; only little-endian files are supported")


class _ZipStorages:
    """Resolves a zip checkpoint's storage records to byte ranges of the memory-mapped file."""

    def __init__(self, path: PathLike, raw_file: BinaryIO, archive: zipfile.ZipFile) -> None:
        self._path = path
        self._raw_file = raw_file
        self._archive = archive
        self.root = _archive_root(archive)
        self._mapped = MappedFile(path)
        _check_byteorder(archive, self.root, self._mapped.size)
        self.storages: dict[str, Storage] = {}

    def read_pickle(self) -> bytes:
        """data.pkl's bytes. torch stores it uncompressed; a deflated one may not expand beyond the size of
        the whole file (a pickle is the small part of a checkpoint; this keeps zip bombs out)."""
        info = self._archive.getinfo(f"{self.root}/data.pkl")
        if info.file_size > self._mapped.size:
            raise CheckpointError(f"'{info.filename}' claims {info.file_size} bytes, more than the whole file")
        return _read_record(self._archive, info, self._mapped.size)

    def load_storage(self, record: tuple) -> Storage:
        storage_type, key, _location, numel = _fields(record, 4, "storage record")
        key = _key(key)
        if key not in self.storages:
            dtype = _storage_dtype(storage_type)
            self.storages[key] = self._locate(key, dtype, _count(numel) * dtype.itemsize)
        return self.storages[key]

    def _locate(self, key: str, dtype: np.dtype, nbytes: int) -> Storage:
        name = f"{self.root}/data/{key}"
        info = self._archive.NameToInfo.get(name)
        if info is None:
            raise CheckpointError(f"storage '{key}' is missing (no '{name}' record)")
        if info.file_size < nbytes:
            raise CheckpointError(f"storage '{key}' holds {info.file_size} bytes, {nbytes} expected")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"record '{name}' is encrypted")
        _check_record(info, self._mapped.size)
        if info.compress_type != zipfile.ZIP_STORED:
            return Storage(key, dtype, nbytes, ZipMemberSource(self._path, name, info.file_size), 0)
        return Storage(key, dtype, nbytes, self._mapped, self._data_offset(info))

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a STORED entry's bytes start: after its *local* header, whose extra field (torch's
        alignment padding) differs from the central directory's."""
        self._raw_file.seek(info.header_offset)
        header = self._raw_file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"bad local zip header for '{info.filename}'")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length


def load_torch_zip(path: PathLike, *, lazy: bool = True) -> Any:
    """The unpickled top-level object of a zip-format torch file (tensors as `LazyTensor`)."""
    with reading(path), open(path, "rb") as raw_file, zipfile.ZipFile(raw_file) as archive:
        storages = _ZipStorages(path, raw_file, archive)
        pickled = storages.read_pickle()
        top = restricted_load(io.BytesIO(pickled), len(pickled), storages.load_storage)
        if not lazy:
            for storage in storages.storages.values():
                storage.load_into_memory()
    return top


# --------------------------------------------------------------------------------------------
# Legacy format (torch < 1.6)
# --------------------------------------------------------------------------------------------


class _LegacyStorages:
    """Collects a legacy file's storage records, then locates them in the data after the pickles."""

    def __init__(self) -> None:
        self.roots: dict[str, Storage] = {}
        self._views: dict[str, tuple[Storage, Storage, int]] = {}

    def load_storage(self, record: tuple) -> Storage:
        storage_type, root_key, _location, numel, view_metadata = _fields(record, 5, "legacy storage record")
        dtype = _storage_dtype(storage_type)
        root_key = _key(root_key)
        root = self.roots.setdefault(root_key, Storage(root_key, dtype, _count(numel) * dtype.itemsize))
        return root if view_metadata is None else self._view(root, view_metadata)

    def _view(self, root: Storage, view_metadata: Any) -> Storage:
        """A storage that is a slice (offset, size in elements) of another one."""
        view_key, offset, size = _fields(view_metadata, 3, "storage view record")
        view_key = _key(view_key)
        if view_key not in self._views:
            itemsize = root.dtype.itemsize
            offset, size = _count(offset), _count(size)
            if (offset + size) * itemsize > root.nbytes:
                raise CheckpointError(f"storage view '{view_key}' exceeds storage '{root.key}'")
            self._views[view_key] = (Storage(view_key, root.dtype, size * itemsize), root, offset * itemsize)
        return self._views[view_key][0]

    def place(self, keys: Any, file: BinaryIO, source: ByteSource) -> None:
        """Walk the data section: for each listed key an int64 element count, then the bytes."""
        if not isinstance(keys, list):
            raise CheckpointError(f"the storage key list is {describe(keys)}")
        position = file.tell()
        for key in map(_key, keys):
            storage = self.roots.get(key)
            if storage is None or storage.source is not None:
                raise CheckpointError(f"storage key '{key}' is listed but not used once by the pickle")
            file.seek(position)
            header = file.read(8)
            if len(header) != 8:
                raise CheckpointError(f"the data of storage '{key}' is truncated")
            (count,) = struct.unpack("<q", header)
            if count * storage.dtype.itemsize != storage.nbytes:
                expected = storage.nbytes // storage.dtype.itemsize
                raise CheckpointError(f"storage '{key}' has {count} elements in the file, {expected} expected")
            storage.place(source, position + 8)
            position += 8 + storage.nbytes
        missing = [key for key, storage in self.roots.items() if storage.source is None]
        if missing:
            raise CheckpointError(f"storage(s) {short_repr(missing)} are missing from the data section")
        for view, root, byte_offset in self._views.values():
            view.place(root.source, root.offset + byte_offset)

    def all_storages(self) -> list[Storage]:
        return [*self.roots.values(), *(view for view, _, _ in self._views.values())]


def _check_legacy_preamble(file: mmap.mmap) -> None:
    if restricted_load(file, len(file)) != LEGACY_MAGIC_NUMBER:
        raise CheckpointError("a pickle without torch's magic number: not a torch checkpoint")
    protocol = restricted_load(file, len(file))
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {short_repr(protocol)}")
    sys_info = restricted_load(file, len(file))
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("only little-endian legacy files are supported")


def load_torch_legacy(path: PathLike, *, lazy: bool = True) -> Any:
    """The unpickled top-level object of a legacy (pre-1.6) torch file (tensors as `LazyTensor`)."""
    with reading(path), open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as file:
        _check_legacy_preamble(file)
        storages = _LegacyStorages()
        top = restricted_load(file, len(file), storages.load_storage)
        keys = restricted_load(file, len(file))
        storages.place(keys, file, MappedFile(path))
        if not lazy:
            for storage in storages.all_storages():
                storage.load_into_memory()
    return top
