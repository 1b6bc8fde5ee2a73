"""The one exception the checkpoint readers raise, and the helper that names the file in it.

Why it exists: a caller (converter, CLI, test) should get one clear `CheckpointError` saying which
file is wrong and why, never a traceback from deep inside zipfile, pickle or struct. The readers bound
every size by the file before allocating, so a MemoryError, or any exception outside READ_ERRORS, means a
gap in those checks: it is still reported as one CheckpointError (with the original as its cause).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from typing import Any, Iterator, Optional, Union

import safetensors

PathLike = Union[str, os.PathLike]

# What zipfile / pickle / struct / json / numpy / the safetensors package raise on corrupt or hostile input.
READ_ERRORS = (
    safetensors.SafetensorError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    pickle.UnpicklingError,
    struct.error,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)


class _ShortRepr(reprlib.Repr):
    """reprlib, also for ints too long for `repr` (it raises past 4300 digits)."""

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 256:
            return f"<int of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_SHORT = _ShortRepr()
_SHORT.maxstring = 80
_SHORT.maxother = 80


def short_repr(value: Any) -> str:
    """A bounded repr for error messages (file contents can be huge)."""
    return _SHORT.repr(value)


class CheckpointError(Exception):
    """A checkpoint file is unreadable, unsupported, or asks for something we refuse to do."""

    def __init__(self, message: str, path: Optional[PathLike] = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@contextlib.contextmanager
def reading(path: PathLike) -> Iterator[None]:
    """Turn every failure while reading `path` into a `CheckpointError` that names the file."""
    try:
        yield
    except CheckpointError as error:
        if error.path is None:
            error.path = os.fspath(path)
        raise
    except OSError:
        raise
    except MemoryError as error:
        raise CheckpointError("refused: reading it needs more memory than is available", path) from error
    except Exception as error:
        kind = "" if isinstance(error, READ_ERRORS) else "unexpected "
        message = f"cannot be read as a checkpoint ({kind}{type(error).__name__}: {error})"
        raise CheckpointError(message, path) from error
