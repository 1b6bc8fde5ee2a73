"""The errors of the libraries that write and read weights (orbax / tensorstore, safetensors), said once.

Their disk errors are no OSError (tensorstore's ValueError "... local file "F" ... [os_error_code='28']", Rust's
"(os error 30)"), so a full or read-only disk would read as a bug: `library_os_error` turns them into the OSError
they stand for, and `os_error_line` into a command's one error line. When a write or read fails, orbax, tensorstore
and asyncio also report it from their threads (hundreds of tracebacks for one full disk, "Event loop is closed"
among them) while the one exception that reaches the caller already says what failed: `LibraryLog` keeps that off
the console. Used by the converted folders and exports (cnc_jax.checkpoint) and the training checkpoints alike.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import gc
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Self

LIBRARY_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; asyncio logs the task exceptions nobody retrieved
# how the libraries name the OS error inside their own exceptions: tensorstore (orbax) "[os_error_code='28']" with
# the file as 'local file "F"', Rust's io::Error (safetensors) "(os error 28)"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
# the status codes tensorstore's errors start with ("OUT_OF_RANGE: Error reading ...")
_TENSORSTORE_ERROR = re.compile(r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                                r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                                r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")
# a disk that refuses a write: full, over quota, read-only, not ours, failing. (ENOENT & co. are a bad path.)
DISK_ERRNOS = frozenset({errnos.ENOSPC, errnos.EDQUOT, errnos.EROFS, errnos.EFBIG, errnos.EIO, errnos.EACCES,
                         errnos.EPERM})
_PARTIAL_TAIL = re.compile(r"\.partial-\d+(/.*|\.partial-.*)?$")


def library_os_error(error: BaseException, path=None, note: str = "") -> OSError | None:
    """The OSError that `error` (or one in its __cause__ / __context__ chain: orbax wraps tensorstore's) stands for,
    with `note` after its reason and as filename the file it names, else `path`; an OSError that names a file
    comes back as it is. None when nothing in the chain names an OS error and `error` is no OSError."""
    seen, link = set(), error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno:
            code, reason, filename = link.errno, link.strerror or os.strerror(link.errno), link.filename or path
            break
        found = _OS_ERROR_CODE.search(str(link))
        if found:
            code = int(found.group(1) or found.group(2))
            local = _LOCAL_FILE.search(str(link))
            reason = os.strerror(code) if code in errnos.errorcode else str(link)
            filename = local.group(1) if local else path
            break
        link = link.__cause__ or link.__context__
    else:
        if not isinstance(error, OSError):
            return None
        link, code, reason, filename = error, error.errno, error.strerror or str(error), error.filename or path
    if link is error and isinstance(error, OSError) and error.filename and not note:
        return error
    return OSError(code, reason + note, os.fspath(filename) if filename is not None else None)


def os_error_line(error: OSError, default) -> tuple[int, str]:
    """(exit status, "<path>: <reason>") of the OSError a command ends with: 1 for a disk that refuses the write
    (DISK_ERRNOS), 2 otherwise (a missing or odd path: bad input). The path is the output a partial file was
    written for (what the user named), `default` when the error names none (a write() error)."""
    path = _PARTIAL_TAIL.sub("", os.fspath(error.filename)) if error.filename else os.fspath(default)
    return (1 if error.errno in DISK_ERRNOS else 2), f"{path}: {error.strerror or error}"


def short_reason(error: BaseException, limit: int = 400) -> str:
    """'Type: first line' of the error at the end of the __cause__ chain (orbax raises tensorstore's errors from
    theirs, which name the file), cut before tensorstore's spec: hundreds of lines of JSON."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    lines = str(error).split("[tensorstore_spec=")[0].strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class LibraryLog(logging.Filter):
    """While open (a `with` block, or open() ... close()): orbax's records at `level` and above on the absl and
    asyncio loggers, any with a traceback through orbax or a tensorstore error (asyncio's "Task exception was never
    retrieved", one per failed write), and the "unraisable" exceptions of its threads (tensorstore's callbacks into
    orbax's closed event loop, "Event loop is closed"; the coroutines of a failed read, collected later) go to the
    file `path` (appended; the system's temporary folder when that cannot be written), or nowhere without one.
    `written` says whether any did. The writes and reads in flight when a call fails finish later, even at exit:
    once one failed, their reports are dropped for the rest of the process (drop_stragglers)."""

    def __init__(self, path: str | None = None, level: int = logging.WARNING):
        super().__init__()
        self.path, self.level, self.lock, self.written = path, level, threading.Lock(), False
        self.format = logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(pathname)s:%(lineno)d "
                                        "%(message)s").format
        self.previous_hook = None

    def open(self) -> Self:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addFilter(self)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self.unraisable
        return self

    def close(self, failed: bool = False) -> None:
        """failed: the call raised (a failure that logged nothing still leaves writes in flight)."""
        failed = failed or self.written
        if failed:
            gc.collect()  # a task whose exception nobody retrieved logs it when collected: now, into the log
        if sys.unraisablehook == self.unraisable:  # else another one opened since and is still open: it forwards
            sys.unraisablehook = self.previous_hook
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if failed:
            drop_stragglers()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)

    @contextlib.contextmanager
    def at(self, level: int):
        """Take orbax's records from `level` up while inside (a restore attempt: its warnings too)."""
        before, self.level = self.level, level
        try:
            yield
        finally:
            self.level = before

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not (_in_orbax(record.pathname) and (record.levelno >= self.level or error is not None)
                or error is not None and (_traceback_in_orbax(record.exc_info[2])
                                          or _TENSORSTORE_ERROR.match(str(error)))):
            return True
        self.write(self.format(record) + "\n")
        return False

    def unraisable(self, unraisable) -> None:
        if _library_unraisable(unraisable):
            self.write(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}\n")
        elif self.previous_hook is not None:
            self.previous_hook(unraisable)

    def write(self, text: str) -> None:
        with self.lock:
            self.written = True
            if self.path is None:
                return
            try:
                self._append(text)
            except OSError:  # the run folder's disk is full, say: the system's temporary folder, else nowhere
                self.path = os.path.join(tempfile.gettempdir(), f"cnc_jax_library_errors_{os.getpid()}.log")
                with contextlib.suppress(OSError):
                    self._append(text)

    def _append(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text)


class _StragglerFilter(logging.Filter):
    """asyncio's "Task (or Future) exception was never retrieved" for a tensorstore error: a read or write of a
    failed orbax call, collected after the call reported its own error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith(("Task exception was never retrieved",
                                                    "Future exception was never retrieved"))
                    and _TENSORSTORE_ERROR.match(str(error)))


_STRAGGLERS_DROPPED = []


def drop_stragglers() -> None:
    """From the first failed orbax call on, drop the two reports of its stragglers (and only those): the unraisable
    exceptions of its threads (_library_unraisable), and task exceptions nobody retrieved (_StragglerFilter)."""
    if _STRAGGLERS_DROPPED:
        return
    _STRAGGLERS_DROPPED.append(True)
    logging.getLogger("asyncio").addFilter(_StragglerFilter())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _library_unraisable(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def _library_unraisable(unraisable) -> bool:
    return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            or _traceback_in_orbax(unraisable.exc_traceback))


def _in_orbax(path: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in path


def _traceback_in_orbax(tb) -> bool:
    while tb is not None:
        if _in_orbax(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False
