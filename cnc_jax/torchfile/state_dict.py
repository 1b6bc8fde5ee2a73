"""Public entry point: `load_state_dict(path)` -> {name: LazyTensor} for any supported checkpoint.

Why it exists: converters should not care whether weights come as a torch zip file, a pre-1.6
legacy torch file or safetensors, nor whether a Lightning wrapper (`{'state_dict': ..., 'optimizer_states': ...,
'callbacks': ..., 'hyper_parameters': ...}`) surrounds them. The format is sniffed from the bytes,
the wrapper is unwrapped, and every returned value is checked to be a tensor — a placeholder for a
refused global (e.g. a pickled `os.system(...)` call, never executed) is reported, never returned.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any, Callable, Literal

import safetensors

from cnc_jax.torchfile.errors import CheckpointError, PathLike, reading
from cnc_jax.torchfile.safetensors_header import read_header
from cnc_jax.torchfile.tensor import LazyTensor, SafetensorsEntry, Storage
from cnc_jax.torchfile.torch_pickle import (
    LEGACY_MAGIC_NUMBER,
    is_refused_global,
    describe,
    load_torch_legacy,
    load_torch_zip,
    short_repr,
)

__all__ = [
    "CheckpointError", "CheckpointFormat", "LazyTensor", "detect_format", "load_raw", "load_safetensors",
    "load_state_dict",
]

CheckpointFormat = Literal["torch_zip", "torch_legacy", "safetensors"]

# How torch pickles its magic number: LONG1, 10 bytes, little-endian (after PROTO, maybe FRAME).
_LEGACY_MAGIC_PICKLED = b"\x8a\x0a" + LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_MAX_REPORTED_PROBLEMS = 10
_MAX_KEY_SHOWN = 300



def load_safetensors(path: PathLike, *, lazy: bool = True) -> dict[str, LazyTensor]:
    """All tensors of a safetensors file by name, read by the `safetensors` package once our header check
    (`read_header`: clear messages, numpy's limits) has passed; `__metadata__` is not a tensor."""
    with reading(path):
        entries, _ = read_header(path)
        handle = safetensors.safe_open(os.fspath(path), framework="numpy")
        tensors = {
            name: LazyTensor(Storage(name, dtype, end - begin, SafetensorsEntry(path, name, end - begin, handle)),
                             dtype, shape)
            for name, (dtype, shape, begin, end) in entries.items()
        }
        if not lazy:
            for tensor in tensors.values():
                tensor.storage.load_into_memory()
    return tensors


_LOADERS: dict[str, Callable[..., Any]] = {
    "torch_zip": load_torch_zip,
    "torch_legacy": load_torch_legacy,
    "safetensors": load_safetensors,
}


def detect_format(path: PathLike) -> CheckpointFormat:
    """Which format `path` is in, from its first bytes."""
    with open(path, "rb") as file:
        head = file.read(32)
        file_size = os.fstat(file.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC_PICKLED in head:
        return "torch_legacy"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= file_size - 8:
        return "safetensors"
    raise CheckpointError(
        "not a recognised checkpoint (expected a torch zip file, a legacy torch file or safetensors)", path
    )


def load_raw(path: PathLike, *, lazy: bool = True) -> Any:
    """The whole top-level object of the file, for debugging: tensors as `LazyTensor`, refused
    globals as `Opaque` placeholders (nothing was executed). Safetensors give {name: tensor}."""
    return _LOADERS[detect_format(path)](path, lazy=lazy)


def load_state_dict(path: PathLike, *, lazy: bool = True) -> dict[str, LazyTensor]:
    """The {name: tensor} weights of a checkpoint, unwrapping a Lightning-style `state_dict` entry.

    With `lazy=True` tensor bytes stay in the (memory-mapped) file until `.numpy()`; with
    `lazy=False` they are copied into memory now. Raises `CheckpointError` naming the file and the
    offending entries if anything in the state dict is not a tensor.
    """
    with reading(path):
        top = load_raw(path, lazy=lazy)
        mapping, where = _tensor_mapping(path, top)
        return _checked_tensors(path, mapping, where)


def _refusal_note(value: Any) -> str:
    return " — refusing to use it; the call was NOT executed" if is_refused_global(value) else ""


def _tensor_mapping(path: PathLike, top: Any) -> tuple[Mapping, str]:
    """The mapping that holds the weights, and how to name it in messages."""
    if not isinstance(top, Mapping):
        message = f"the top-level object is {describe(top)}, not a mapping of tensors{_refusal_note(top)}"
        raise CheckpointError(message, path)
    if "state_dict" not in top:
        return top, ""
    inner = top["state_dict"]
    if not isinstance(inner, Mapping):
        message = f"entry 'state_dict' is {describe(inner)}, not a tensor mapping{_refusal_note(inner)}"
        raise CheckpointError(message, path)
    return inner, " of 'state_dict'"


def _checked_tensors(path: PathLike, mapping: Mapping, where: str) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    problems = []
    for key, value in mapping.items():
        if not isinstance(key, str):
            problems.append(f"key {short_repr(key)}{where} is {describe(key)}, not a string{_refusal_note(key)}")
        elif isinstance(value, LazyTensor):
            tensors[key] = value
        else:
            name = repr(key) if len(key) <= _MAX_KEY_SHOWN else short_repr(key)  # a key may be megabytes long
            problems.append(f"entry {name}{where} is {describe(value)}, not a tensor{_refusal_note(value)}")
    if problems:
        shown = problems[:_MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise CheckpointError("; ".join(shown), path)
    return tensors
