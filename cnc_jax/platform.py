"""Backend settings the scripts apply before JAX starts its backend.

On x86 CPUs XLA's oneDNN path for matmuls and convolutions is much faster than its default Eigen path
(2-core Xeon, fp32: 237 vs 125 GFLOP/s for a 2048² matmul, 224 vs 128 GFLOP/s for a 3x3 conv), with
the same parity against the references. XLA reads XLA_FLAGS when the backend is created, so this must
run before the first JAX computation; a flag the user already set is left alone.

configure_host_malloc keeps freed host memory in the process for the next XLA call (training on CPU hosts).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform as std_platform
import sys

CPU_FLAGS = ("--xla_cpu_use_onednn=true",)


def configure_cpu(enable: bool = True) -> str:
    """Add the fast CPU flags to XLA_FLAGS (harmless on GPU/TPU hosts); returns the resulting XLA_FLAGS."""
    flags = os.environ.get("XLA_FLAGS", "")
    if enable:
        for flag in CPU_FLAGS:
            if flag.split("=")[0] not in flags:
                flags = f"{flags} {flag}".strip()
        os.environ["XLA_FLAGS"] = flags
    return flags


# glibc's malloc hands every allocation above its mmap threshold (and, in the per-thread arenas, every one larger
# than an arena heap, 64 MB) straight to mmap and back to the kernel on free. XLA CPU allocates each executable's
# temporary buffers on every call, so a full-size training step re-faults ~1.3M fresh pages per call (5 GB; 5-10 s of
# system time per step on 2 cores). Keeping freed memory in one brk heap (no mmap, no trim, one arena) lets the next
# call reuse the same pages: for the training step (one program, called again and again) the peak memory is the same
# (19.6 GB at 512²). Where programs of different sizes alternate (sampling's conditions, loop and VAE decode) the one
# heap fragments and the peak grows (8.8 -> 11.6 GB in bench/sample_bench.py), so only training sets it.
HOST_MALLOC_ENV = "CNC_HOST_MALLOC"
HOST_MALLOC_MODES = ("auto", "retain", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_RETAIN = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))


def _cpu_backend_expected(environ) -> bool:
    """Whether JAX will run on the host CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def host_malloc_plan(environ=None) -> str:
    """What configure_host_malloc does: 'retain', or why it leaves malloc alone ('system', 'GLIBC_TUNABLES',
    'accelerator', 'not glibc'). Raises ValueError for a CNC_HOST_MALLOC that is not one of HOST_MALLOC_MODES."""
    environ = os.environ if environ is None else environ
    mode = environ.get(HOST_MALLOC_ENV, "auto")
    if mode not in HOST_MALLOC_MODES:
        raise ValueError(f"{HOST_MALLOC_ENV}={mode!r}: must be one of {', '.join(HOST_MALLOC_MODES)}")
    if mode == "system":
        return "system"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"  # the user's own malloc settings win
    if std_platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if mode == "auto" and not _cpu_backend_expected(environ):
        return "accelerator"
    return "retain"


def configure_host_malloc(environ=None) -> str:
    """Apply host_malloc_plan's 'retain' (mallopt) and return the plan. Only fully effective before the process
    starts threads (numpy's BLAS, XLA's pools): cnc_jax.cli.host_memory calls it on import.
    A bad CNC_HOST_MALLOC prints one error line and exits with status 2."""
    try:
        plan = host_malloc_plan(environ)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if plan == "retain":
        libc = ctypes.CDLL(None)
        for param, value in _RETAIN:
            libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
    return plan
