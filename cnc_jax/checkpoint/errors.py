"""The one exception the checkpoint readers raise, and the helper that names the file in it.

Why it exists: a caller (converter, CLI, test) should get one clear `CheckpointError` saying which
file is wrong and why, never a traceback from deep inside zipfile, pickle or struct.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
import zlib
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# What zipfile / pickle / struct / json / numpy raise on corrupt or hostile input.
READ_ERRORS = (
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
    except READ_ERRORS as error:
        raise CheckpointError(
            f"cannot be read as a checkpoint ({type(error).__name__}: {error})", path
        ) from error
