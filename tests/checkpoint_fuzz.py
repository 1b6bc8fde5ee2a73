"""Test helper (not a test module): corrupt and hostile checkpoints, and a runner that loads each one in a
child process under an address-space limit and a time limit.

Why it exists: checkpoints come from the internet. Whatever the bytes, the reader must either load the file
or raise `CheckpointError` — never another exception, a crash, a hang, or an allocation out of proportion
to the file (the child's address space is capped at what it uses after start-up plus `MEMORY_ALLOWANCE`).

A case is a descriptor (family, source, mutator, seed); the child turns it into bytes deterministically,
so no case files are kept and any case can be rebuilt by name. Families: `zip` (mutated `data.pkl` of a
torch zip file), `zip_meta` (mutated zip directory), `legacy` and `safetensors` (mutated raw files),
`original` (the unmodified files) and `hostile` (hand-made files, each with its expected outcome).

  python -m tests.checkpoint_fuzz                    # run every case, print the outcomes by class
  python -m tests.checkpoint_fuzz --show NAME        # load one case in this process (full traceback)
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import gc
import io
import json
import os
import pickle
import pickletools
import queue
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from cnc_jax.torchfile.errors import READ_ERRORS, CheckpointError
from cnc_jax.torchfile.state_dict import load_state_dict
from tests.torch_files import Call, Global, View, torch_legacy_bytes, torch_zip_bytes, torch_zip_entries, zip_archive

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = Path(os.environ.get("CNC_REFERENCE_DIR", REPO / ".." / "shared" / "reference"))
MEMORY_ALLOWANCE = 256 << 20  # bytes a child may map beyond start-up, plus 4x the largest reference file
CASE_TIMEOUT_S = 60.0  # per case; a loaded 2-core CI machine needs seconds for the deepest ones
ACCEPTED = ("loaded", "refused")
DEEP = 1_000_000  # nesting levels of the deep-nesting cases (a C-level recursion this deep overflows the stack)
SHALLOWER = DEEP // 10  # for containers whose C code guards its recursion: enough to test the nesting bound

ZIP_SOURCES = ("tiny_u2netp.pth", "tiny_cnc.ckpt")
LEGACY_SOURCES = ("tiny_u2netp_legacy.pth",)
SAFETENSORS_SOURCES = ("tiny_cnc.safetensors",)
# family -> (reference files, {mutator: cases per file})
PLAN: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {
    "zip": (ZIP_SOURCES, {"flip": 20, "truncate": 8, "insert": 8, "overwrite_int": 16, "insert_opcode": 16}),
    "zip_meta": (ZIP_SOURCES, {"flip": 10, "overwrite_int": 10}),
    "legacy": (LEGACY_SOURCES, {"flip": 25, "truncate": 10, "insert": 10, "overwrite_int": 20, "insert_opcode": 20,
                                "flip_data": 5}),
    "safetensors": (SAFETENSORS_SOURCES, {"flip": 25, "truncate": 8, "insert": 8, "overwrite_int": 15,
                                          "header_field": 40}),
}


@dataclass(frozen=True)
class Case:
    family: str
    source: str  # reference file name, or the hostile case's name
    mutator: str = ""
    seed: int = 0

    @property
    def name(self) -> str:
        return "/".join((self.family, self.source, self.mutator, str(self.seed)))


@dataclass(frozen=True)
class Result:
    case: Case
    outcome: str  # "loaded", "refused", or what went wrong (exception type, "crashed", "hang")
    detail: str


# --------------------------------------------------------------------------------------------
# Byte mutators: (data, region, rng) -> data, changing only bytes inside the region
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    start: int
    stop: int
    opcode_starts: tuple[int, ...] = ()  # where pickle opcodes begin (pickle regions only)


BOUNDARY_INTS = (("<I", 2**32 - 1), ("<I", 2**31 - 1), ("<I", 2**28), ("<i", -1), ("<Q", 2**64 - 1),
                 ("<Q", 2**63 - 1), ("<Q", 2**40), ("<H", 2**16 - 1))


# opcodes whose argument asks for far more than any small file holds
HOSTILE_OPCODES = (
    pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1),
    pickle.PUT + b"999999999999\n",
    pickle.LONG_BINGET + struct.pack("<I", 2**32 - 1),
    pickle.FRAME + struct.pack("<Q", 2**40),
    pickle.BINBYTES + struct.pack("<I", 2**32 - 1),
    pickle.BINBYTES8 + struct.pack("<Q", 2**40),
    pickle.BINUNICODE8 + struct.pack("<Q", 2**40),
    pickle.BYTEARRAY8 + struct.pack("<Q", 2**40),
    pickle.LONG4 + struct.pack("<i", 2**31 - 1),
    pickle.MARK * 64,
    pickle.EMPTY_TUPLE + pickle.TUPLE1 * DEEP,
)


def flip(data: bytes, region: Region, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(region.start, region.stop)] ^= rng.randrange(1, 256)
    return bytes(out)


def truncate(data: bytes, region: Region, rng: random.Random) -> bytes:
    return data[: rng.randrange(region.start, region.stop)]


def insert(data: bytes, region: Region, rng: random.Random) -> bytes:
    position = rng.randrange(region.start, region.stop + 1)
    return data[:position] + rng.randbytes(rng.randint(1, 16)) + data[position:]


def overwrite_int(data: bytes, region: Region, rng: random.Random) -> bytes:
    fmt, value = rng.choice(BOUNDARY_INTS)
    packed = struct.pack(fmt, value)
    position = rng.randrange(region.start, max(region.start + 1, region.stop - len(packed)))
    return data[:position] + packed + data[position + len(packed):]


def insert_opcode(data: bytes, region: Region, rng: random.Random) -> bytes:
    position = rng.choice(region.opcode_starts)
    return data[:position] + rng.choice(HOSTILE_OPCODES) + data[position:]


MUTATORS: dict[str, Callable[[bytes, Region, random.Random], bytes]] = {
    "flip": flip, "truncate": truncate, "insert": insert, "overwrite_int": overwrite_int,
    "insert_opcode": insert_opcode, "flip_data": flip,
}


def pickle_region(data: bytes, count: int = 1) -> Region:
    """The `count` consecutive pickles at the start of `data`, with their opcode positions."""
    stream = io.BytesIO(data)
    starts = []
    for _ in range(count):
        starts += [position for _, _, position in pickletools.genops(stream)]
    return Region(0, stream.tell(), tuple(starts))


# --------------------------------------------------------------------------------------------
# Safetensors header mutations: (header dict, tensor name) -> header dict or raw header bytes
# --------------------------------------------------------------------------------------------


def _set(field: str, value) -> Callable[[dict, str], dict]:
    def mutate(header: dict, name: str) -> dict:
        header[name][field] = value
        return header

    return mutate


def _edit(field: str, change: Callable) -> Callable[[dict, str], dict]:
    def mutate(header: dict, name: str) -> dict:
        header[name][field] = change(header[name][field])
        return header

    return mutate


def _replace_entry(value) -> Callable[[dict, str], dict]:
    def mutate(header: dict, name: str) -> dict:
        header[name] = value
        return header

    return mutate


def _metadata(value) -> Callable[[dict, str], dict]:
    def mutate(header: dict, name: str) -> dict:
        header["__metadata__"] = value
        return header

    return mutate


HEADER_MUTATIONS: tuple[Callable[[dict, str], dict], ...] = (
    _edit("shape", lambda shape: shape + [2**62]),
    _set("shape", [2**64]),
    _set("shape", [-1]),
    _set("shape", [True]),
    _set("shape", [1.5]),
    _set("shape", "4"),
    _edit("shape", lambda shape: [1] * 100 + shape),  # same element count, more dims than numpy has
    _edit("shape", lambda shape: [0] + shape),
    _set("dtype", "F33"),
    _set("dtype", None),
    _set("dtype", ["F32"]),
    _set("dtype", {"F32": 1}),
    _set("dtype", "BOOL"),
    _edit("data_offsets", lambda offsets: offsets[::-1]),
    _edit("data_offsets", lambda offsets: [offsets[0], 2**64]),
    _edit("data_offsets", lambda offsets: [-8, offsets[1]]),
    _edit("data_offsets", lambda offsets: [offsets[0], offsets[1] + 1]),
    _edit("data_offsets", lambda offsets: [offset + 8 for offset in offsets]),  # overlaps its neighbour
    _edit("data_offsets", lambda offsets: [2**63 + offset for offset in offsets]),
    _edit("data_offsets", lambda offsets: [float(offset) for offset in offsets]),
    _edit("data_offsets", lambda offsets: offsets[:1]),
    _set("data_offsets", "0-16"),
    _replace_entry(None),
    _replace_entry([]),
    _replace_entry({}),
    _metadata({"format": 1}),
    _metadata([1, 2]),
)


def mutate_safetensors_header(data: bytes, seed: int) -> bytes:
    """One of HEADER_MUTATIONS (chosen by `seed`) on a random tensor's entry; the data buffer is kept."""
    rng = random.Random(seed)
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    name = rng.choice(sorted(key for key in header if key != "__metadata__"))
    header = HEADER_MUTATIONS[seed % len(HEADER_MUTATIONS)](header, name)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + header_size :]


# --------------------------------------------------------------------------------------------
# Hand-made hostile files
# --------------------------------------------------------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _plain(value) -> bytes:
    """The opcodes pushing plain data `value` (no memo entries)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(value)
    return buffer.getvalue()[2:-1]


def _pickle(body: bytes, protocol: int = 2) -> bytes:
    return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def _weights(value: bytes) -> bytes:
    """A pickle of {'w': <the object `value` pushes>}."""
    return _pickle(pickle.EMPTY_DICT + _text("w") + value + pickle.SETITEM)


def _zip(pickled: bytes, storages: Optional[dict[str, bytes]] = None) -> bytes:
    return zip_archive(torch_zip_entries("archive", pickled, storages or {}))


def _tensor(numel, offset=0, shape=(4,), stride=(1,), storage_type="FloatStorage", key="0") -> bytes:
    """_rebuild_tensor_v2 over a storage record, with every field as given (no consistency)."""
    record = (pickle.MARK + _text("storage") + _global("torch", storage_type) + _plain(key) + _text("cpu")
              + _plain(numel) + pickle.TUPLE + pickle.BINPERSID)
    ordered_dict = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + record + _plain(offset) + _plain(shape)
            + _plain(stride) + pickle.NEWFALSE + ordered_dict + pickle.TUPLE + pickle.REDUCE)


def _tensor_file(**fields) -> bytes:
    """A zip checkpoint {'w': tensor} over a 4-element float32 storage '0'."""
    return _zip(_weights(_tensor(**{"numel": 4, **fields})), {"0": bytes(16)})


def _view_file(shape, stride, offset=0, elements=4) -> bytes:
    import numpy as np

    return torch_zip_bytes({"w": View(np.zeros(elements, np.float32), shape, stride, offset)})


def _chain(callable_ops: bytes, leaf: bytes) -> bytes:
    """callable(callable(...callable(leaf))) DEEP levels deep, the callable memoised once."""
    return (callable_ops + pickle.BINPUT + b"\0" + pickle.POP + (pickle.BINGET + b"\0") * DEEP + leaf
            + (pickle.TUPLE1 + pickle.REDUCE) * DEEP)


def _list_chain() -> bytes:
    """SHALLOWER memoised lists, each appended to the previous one afterwards (depth invisible when built)."""
    count = SHALLOWER
    make = b"".join(pickle.EMPTY_LIST + pickle.LONG_BINPUT + struct.pack("<I", i) + pickle.POP for i in range(count))
    link = b"".join(pickle.LONG_BINGET + struct.pack("<I", i) + pickle.LONG_BINGET + struct.pack("<I", i + 1)
                    + pickle.APPEND + pickle.POP for i in range(count - 1))
    return make + link + pickle.LONG_BINGET + struct.pack("<I", 0)


def _deep_dicts() -> bytes:
    return (pickle.EMPTY_DICT + _text("a")) * SHALLOWER + pickle.NONE + pickle.SETITEM * SHALLOWER


def _deep_tuple() -> bytes:
    return pickle.EMPTY_TUPLE + pickle.TUPLE1 * DEEP


def _patch_central_sizes(archive: bytes, member_suffix: str, size: int) -> bytes:
    """Claim `size` compressed and uncompressed bytes for one member in the central directory."""
    out = bytearray(archive)
    start = zipfile.ZipFile(io.BytesIO(archive)).start_dir
    position = start
    while out[position : position + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack("<HHH", out[position + 28 : position + 34])
        name = bytes(out[position + 46 : position + 46 + name_length]).decode()
        if name.endswith(member_suffix):
            out[position + 20 : position + 28] = struct.pack("<II", size, size)
        position += 46 + name_length + extra_length + comment_length
    return bytes(out)


def _compressed_zip(pickled: bytes, storages: dict[str, bytes]) -> bytes:
    return zip_archive(torch_zip_entries("archive", pickled, storages), compressed=True)


def _legacy(main: bytes, keys: bytes = _plain([]), data: bytes = b"") -> bytes:
    """A legacy torch file with the given main pickle, key-list pickle and data section."""
    preamble = torch_legacy_bytes({})
    region = pickle_region(preamble, 3)
    return preamble[: region.stop] + main + _pickle(keys) + data


def _safetensors(header: bytes, data: bytes = b"", size: Optional[int] = None) -> bytes:
    return struct.pack("<Q", len(header) if size is None else size) + header + data


def _safetensors_entry(**fields) -> bytes:
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **fields}
    return _safetensors(json.dumps({"w": entry}).encode(), bytes(16))


def _huge_length(opcode: bytes, fmt: str, value: int) -> bytes:
    return _zip(_pickle(pickle.EMPTY_DICT + opcode + struct.pack(fmt, value) + b"abc" + pickle.POP, protocol=4))


OS_SYSTEM = _global("os", "system") + _text("echo pwned") + pickle.TUPLE1 + pickle.REDUCE

# name -> (builder, expected outcome)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # refused globals: never imported, never called
    "os_system_top": (lambda: _zip(_pickle(OS_SYSTEM)), "refused"),
    "os_system_weight": (lambda: _zip(_weights(OS_SYSTEM)), "refused"),
    "eval_weight": (lambda: torch_zip_bytes({"w": Call("builtins", "eval", ("1+1",))}), "refused"),
    "popen_global": (lambda: torch_zip_bytes({"w": Global("subprocess", "Popen")}), "refused"),
    "inst_os_system": (lambda: _zip(_weights(pickle.MARK + _text("id") + pickle.INST + b"os\nsystem\n")),
                       "refused"),
    "build_on_placeholder_class": (lambda: _zip(_weights(
        _global("os", "system") + pickle.NONE + pickle.EMPTY_DICT + _text("__repr__") + _global("torch", "device")
        + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD)), "refused"),
    "build_on_allowed_class": (lambda: _zip(_weights(
        _global("collections", "OrderedDict") + pickle.NONE + pickle.EMPTY_DICT + _text("fromkeys") + pickle.NONE
        + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD)), "refused"),
    # deep nesting
    "deep_tuple_key": (lambda: _zip(_pickle(pickle.EMPTY_DICT + _deep_tuple() + pickle.NONE + pickle.SETITEM)),
                       "refused"),
    "deep_tuple_weight": (lambda: _zip(_weights(_deep_tuple())), "refused"),
    "deep_mark_tuple_key": (lambda: _zip(_pickle(
        pickle.EMPTY_DICT + pickle.MARK * DEEP + pickle.TUPLE * DEEP + pickle.NONE + pickle.SETITEM)), "refused"),
    "deep_slice_weight": (lambda: _zip(_weights(_chain(_global("builtins", "slice"), pickle.NONE))), "refused"),
    "deep_placeholder_weight": (lambda: _zip(_weights(_chain(_global("os", "system"), pickle.NONE))), "refused"),
    "deep_frozenset_weight": (lambda: _zip(_weights(_chain(_global("builtins", "frozenset"), pickle.EMPTY_LIST))),
                              "refused"),
    "deep_dict_weight": (lambda: _zip(_weights(_deep_dicts())), "refused"),
    "deep_list_chain_weight": (lambda: _zip(_weights(_list_chain())), "refused"),
    "deep_json_safetensors": (lambda: _safetensors(b"[" * DEEP + b"]" * DEEP), "refused"),
    # memo indices, frames and lengths far beyond the stream
    "huge_long_binput": (lambda: _zip(_pickle(pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1))),
                         "refused"),
    "huge_put": (lambda: _zip(_pickle(pickle.EMPTY_DICT + pickle.PUT + b"1000000000000000000\n")), "refused"),
    "huge_long_binget": (lambda: _zip(_pickle(pickle.LONG_BINGET + struct.pack("<I", 2**32 - 1))), "refused"),
    "huge_frame": (lambda: _zip(pickle.PROTO + b"\4" + pickle.FRAME + struct.pack("<Q", 2**40) + pickle.EMPTY_DICT
                                + pickle.STOP), "refused"),
    "huge_frame_max": (lambda: _zip(pickle.PROTO + b"\4" + pickle.FRAME + struct.pack("<Q", 2**64 - 1)
                                    + pickle.EMPTY_DICT + pickle.STOP), "refused"),
    "huge_binbytes": (lambda: _huge_length(pickle.BINBYTES, "<I", 2**32 - 1), "refused"),
    "huge_binbytes8": (lambda: _huge_length(pickle.BINBYTES8, "<Q", 2**40), "refused"),
    "huge_binunicode": (lambda: _huge_length(pickle.BINUNICODE, "<I", 2**32 - 1), "refused"),
    "huge_binunicode8": (lambda: _huge_length(pickle.BINUNICODE8, "<Q", 2**40), "refused"),
    "huge_bytearray8": (lambda: _huge_length(pickle.BYTEARRAY8, "<Q", 2**40), "refused"),
    "huge_binstring": (lambda: _huge_length(pickle.BINSTRING, "<i", 2**31 - 1), "refused"),
    "huge_long4": (lambda: _huge_length(pickle.LONG4, "<i", 2**31 - 1), "refused"),
    "many_marks": (lambda: _zip(_pickle(pickle.MARK * DEEP + pickle.EMPTY_DICT)), "refused"),
    "unknown_opcode": (lambda: _zip(_pickle(b"\xff")), "refused"),
    # tensors whose geometry does not fit the storage
    "shape_exceeds_storage": (lambda: _view_file((5,), (1,)), "refused"),
    "stride_exceeds_storage": (lambda: _view_file((2, 2), (3, 1)), "refused"),
    "offset_exceeds_storage": (lambda: _view_file((4,), (1,), offset=1), "refused"),
    "negative_offset": (lambda: _tensor_file(offset=-1), "refused"),
    "negative_stride": (lambda: _view_file((2, 2), (-1, 1)), "refused"),
    "broadcast_bomb": (lambda: _view_file((2**20, 2**20), (0, 0), elements=1), "refused"),
    "broadcast_small": (lambda: _view_file((8, 3), (0, 1), elements=3), "loaded"),
    "huge_dim_stride_0": (lambda: _view_file((2**70,), (0,), elements=1), "refused"),
    "size_1_dim_huge_stride": (lambda: _view_file((1, 4), (2**62, 1)), "loaded"),  # a size-1 dim never steps
    "too_many_dims": (lambda: _view_file((1,) * 100, (1,) * 100, elements=1), "refused"),
    "float_dims": (lambda: _tensor_file(shape=(4.0,)), "refused"),
    "bool_dims": (lambda: _tensor_file(shape=(True,)), "refused"),
    "storage_numel_huge": (lambda: _tensor_file(numel=2**62), "refused"),
    "storage_numel_negative": (lambda: _tensor_file(numel=-4), "refused"),
    "unknown_storage_type": (lambda: _tensor_file(storage_type="EvilStorage"), "refused"),
    "storage_key_not_text": (lambda: _tensor_file(key=5), "refused"),
    "missing_storage_record": (lambda: _tensor_file(key="7"), "refused"),
    # zip records claiming more bytes than the file has
    "stored_pickle_size_lie": (lambda: _patch_central_sizes(_zip(_weights(pickle.NONE)), "data.pkl", 2**32 - 1),
                               "refused"),
    "deflated_pickle_size_lie": (lambda: _patch_central_sizes(
        _compressed_zip(_weights(pickle.NONE), {}), "data.pkl", 2**32 - 1), "refused"),
    "deflated_pickle_bomb": (lambda: _compressed_zip(_pickle(
        pickle.BINBYTES8 + struct.pack("<Q", 32 << 20) + bytes(32 << 20) + pickle.POP + pickle.EMPTY_DICT), {}),
        "refused"),
    "deflated_storage_size_lie": (lambda: _patch_central_sizes(
        _compressed_zip(_weights(_tensor(numel=2**30 - 1)), {"0": bytes(16)}), "data/0", 2**32 - 4), "refused"),
    # legacy files
    "legacy_huge_long_binput": (lambda: _legacy(_pickle(pickle.EMPTY_DICT + pickle.LONG_BINPUT
                                                        + struct.pack("<I", 2**32 - 1))), "refused"),
    "legacy_huge_binbytes8": (lambda: _legacy(_pickle(pickle.BINBYTES8 + struct.pack("<Q", 2**40), protocol=4)),
                              "refused"),
    "legacy_deep_tuple_key": (lambda: _legacy(_pickle(pickle.EMPTY_DICT + _deep_tuple() + pickle.NONE
                                                      + pickle.SETITEM)), "refused"),
    "legacy_keys_not_a_list": (lambda: _legacy(_pickle(pickle.EMPTY_DICT), keys=_plain("0")), "refused"),
    "legacy_no_main_pickle": (lambda: torch_legacy_bytes({})[: pickle_region(torch_legacy_bytes({}), 3).stop],
                              "refused"),
    # safetensors headers
    "safetensors_header_size_max": (lambda: _safetensors(b"{}", size=2**64 - 1), "refused"),
    "safetensors_header_size_zero": (lambda: _safetensors(b"{}", size=0), "refused"),
    "safetensors_header_array": (lambda: _safetensors(b"[]"), "refused"),
    "safetensors_nan_offsets": (lambda: _safetensors(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[NaN,16]}}',
                                                     bytes(16)), "refused"),
    "safetensors_huge_int": (lambda: _safetensors(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],'
                                                  b'"data_offsets":[0,16]}}', bytes(16)), "refused"),
    "safetensors_many_dims": (lambda: _safetensors_entry(shape=[2**62] * 400_000), "refused"),
    "safetensors_gap_between_tensors": (lambda: _safetensors(json.dumps({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode(), bytes(12)), "refused"),
    "safetensors_valid": (lambda: _safetensors_entry(), "loaded"),
}


# --------------------------------------------------------------------------------------------
# Cases -> bytes
# --------------------------------------------------------------------------------------------


def all_cases() -> list[Case]:
    """Every case: the originals, PLAN's mutations (fixed seeds) and the hostile files."""
    cases = [Case("original", source) for sources, _ in PLAN.values() for source in sources]
    cases = list(dict.fromkeys(cases))
    for family, (sources, counts) in PLAN.items():
        for source in sources:
            cases += [Case(family, source, mutator, seed) for mutator, count in counts.items() for seed in range(count)]
    return cases + [Case("hostile", name) for name in HOSTILE]


class CaseBuilder:
    """Turns cases into file bytes; reads each reference file once."""

    def __init__(self, reference_dir: Path) -> None:
        self.reference_dir = Path(reference_dir)
        self._raw: dict[str, bytes] = {}
        self._zip_entries: dict[str, list[tuple[str, bytes]]] = {}
        self._regions: dict[tuple[str, str], Region] = {}

    def raw(self, source: str) -> bytes:
        if source not in self._raw:
            self._raw[source] = (self.reference_dir / source).read_bytes()
        return self._raw[source]

    def entries(self, source: str) -> list[tuple[str, bytes]]:
        """The records of a zip reference file, data.pkl first."""
        if source not in self._zip_entries:
            with zipfile.ZipFile(io.BytesIO(self.raw(source))) as archive:
                entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
            entries.sort(key=lambda entry: not entry[0].endswith("/data.pkl"))
            self._zip_entries[source] = entries
        return self._zip_entries[source]

    def build(self, case: Case) -> bytes:
        if case.family == "hostile":
            return HOSTILE[case.source][0]()
        if case.family == "original":
            return self.raw(case.source)
        if case.family == "zip":
            (name, pickled), *rest = self.entries(case.source)
            return zip_archive([(name, self._mutate(case, pickled)), *rest])
        if case.mutator == "header_field":
            return mutate_safetensors_header(self.raw(case.source), case.seed)
        return self._mutate(case, self.raw(case.source))

    def _mutate(self, case: Case, data: bytes) -> bytes:
        key = (case.source, case.family if case.mutator != "flip_data" else case.mutator)
        if key not in self._regions:
            self._regions[key] = self._region(case, data)
        return MUTATORS[case.mutator](data, self._regions[key], random.Random(case.name))

    @staticmethod
    def _region(case: Case, data: bytes) -> Region:
        if case.family == "zip":
            return pickle_region(data)
        if case.family == "zip_meta":
            return Region(zipfile.ZipFile(io.BytesIO(data)).start_dir, len(data))
        if case.family == "safetensors":
            return Region(0, 8 + struct.unpack("<Q", data[:8])[0])
        pickles = pickle_region(data, 5)
        return Region(pickles.stop, len(data)) if case.mutator == "flip_data" else pickles


# --------------------------------------------------------------------------------------------
# Loading one case, and the child process
# --------------------------------------------------------------------------------------------


def load_fully(path: str) -> int:
    """What a converter does with a checkpoint: read the state dict and every tensor's values."""
    tensors = load_state_dict(path)
    for tensor in tensors.values():
        tensor.numpy()
    return len(tensors)


def _unexpected_cause(error: BaseException) -> Optional[BaseException]:
    """A MemoryError, or an exception the reader does not expect from corrupt input, behind `error`."""
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, MemoryError) or not isinstance(cause, (CheckpointError, *READ_ERRORS)):
            return cause
        cause = cause.__cause__
    return None


def outcome_of(path: str) -> tuple[str, str]:
    """(outcome class, detail) of loading `path`."""
    try:
        count = load_fully(path)
    except CheckpointError as error:
        cause = _unexpected_cause(error)
        if cause is not None:
            return f"{type(cause).__name__} (caught by the reader)", str(error)[:300]
        return "refused", str(error)[:300]
    except BaseException as error:  # noqa: B036 — everything else is the finding
        return type(error).__name__, str(error)[:300]
    return "loaded", f"{count} tensors"


def _limit_address_space(reference_dir: Path) -> None:
    """Cap the address space: a load may use a few times the file's size, never gigabytes."""
    largest = max((reference_dir / source).stat().st_size for sources, _ in PLAN.values() for source in sources)
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = in_use + MEMORY_ALLOWANCE + 4 * largest
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def child_main(cases_file: str, reference_dir: str) -> None:
    """Load each case of `cases_file`, printing one JSON line [name, outcome, detail] as each finishes."""
    faulthandler.enable()
    cases = [Case(**fields) for fields in json.loads(Path(cases_file).read_text())]
    builder = CaseBuilder(Path(reference_dir))
    _limit_address_space(Path(reference_dir))
    with tempfile.TemporaryDirectory(prefix="cnc_fuzz_") as folder:
        path = os.path.join(folder, "case.bin")
        for case in cases:
            Path(path).write_bytes(builder.build(case))
            outcome, detail = outcome_of(path)
            gc.collect()  # whatever the case left behind is freed before its outcome is reported
            print(json.dumps([case.name, outcome, detail]), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: batches of cases per child; a crash or hang is charged to the first unreported case
# --------------------------------------------------------------------------------------------


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _run_child(
    cases: list[Case], reference_dir: Path, timeout: float, folder: str
) -> tuple[list[Result], Optional[tuple[str, str]]]:
    """Results of the cases one child reported, and (outcome, detail) for the next one if the child died."""
    cases_file = os.path.join(folder, f"cases-{id(cases)}.json")
    Path(cases_file).write_text(json.dumps([asdict(case) for case in cases]))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen([sys.executable, "-m", "tests.checkpoint_fuzz", "--child", cases_file, "--reference",
                                  str(reference_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                 env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        by_name = {case.name: case for case in cases}
        results = []
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                child.kill()
                child.wait()
                return results, ("hang", f"no outcome within {timeout:.0f} s; killed")
            if line is None:
                break
            name, outcome, detail = json.loads(line)
            results.append(Result(by_name[name], outcome, detail))
        returncode = child.wait()
        stderr.seek(0)
        lines_of_stderr = stderr.read().decode(errors="replace").splitlines()
        tail = " | ".join(line.strip() for line in lines_of_stderr if line.strip())[:300]
    if len(results) < len(cases):
        return results, ("crashed", f"{_exit_text(returncode)}: {tail}")
    return results, None


def _run_batch(cases: list[Case], reference_dir: Path, timeout: float) -> list[Result]:
    results: list[Result] = []
    remaining = list(cases)
    with tempfile.TemporaryDirectory(prefix="cnc_fuzz_cases_") as folder:
        while remaining:
            reported, failure = _run_child(remaining, reference_dir, timeout, folder)
            results += reported
            remaining = remaining[len(reported):]
            if failure is not None:
                results.append(Result(remaining[0], *failure))
                remaining = remaining[1:]
    return results


def run_cases(
    cases: list[Case], reference_dir: Path, workers: int = 2, timeout: float = CASE_TIMEOUT_S
) -> list[Result]:
    """Every case's result, the cases shared round-robin among `workers` child processes at a time."""
    batches = [cases[index::workers] for index in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda batch: _run_batch(batch, reference_dir, timeout), batches))
    order = {case.name: index for index, case in enumerate(cases)}
    return sorted((result for batch in done for result in batch), key=lambda result: order[result.case.name])


def unexpected(results: list[Result]) -> list[Result]:
    """Results that are neither a load nor a refusal, and hostile cases whose outcome is not the expected one."""
    return [result for result in results if result.outcome not in ACCEPTED
            or (result.case.family == "hostile" and result.outcome != HOSTILE[result.case.source][1])]


def summary(results: list[Result]) -> str:
    """Counts by family and outcome, then every unexpected result."""
    counts = collections.Counter((result.case.family, result.outcome) for result in results)
    lines = [f"{len(results)} cases"]
    lines += [f"  {family:<12} {outcome:<40} {count}" for (family, outcome), count in sorted(counts.items())]
    totals = collections.Counter(result.outcome for result in results)
    lines += ["  total:"] + [f"  {'':<12} {outcome:<40} {count}" for outcome, count in sorted(totals.items())]
    lines += [f"UNEXPECTED {result.case.name}: {result.outcome}: {result.detail}" for result in unexpected(results)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE_DIR))
    parser.add_argument("--child", metavar="CASES_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--show", metavar="NAME", help="load this case here, with a traceback")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.reference)
        return 0
    if args.show:
        case = next(case for case in all_cases() if case.name == args.show)
        with tempfile.NamedTemporaryFile(suffix=".bin") as file:
            file.write(CaseBuilder(Path(args.reference)).build(case))
            file.flush()
            print(load_fully(file.name), "tensors")
        return 0
    results = run_cases(all_cases(), Path(args.reference))
    print(summary(results))
    return 1 if unexpected(results) else 0


if __name__ == "__main__":
    sys.exit(main())
