"""Imported first by the training command (`cnc_jax.cli.train`, bench/train_bench.py), before numpy and jax start
their threads: sets the host allocator for the process (`platform.configure_host_malloc`; PLAN says what it did).

Only training gains: its step is one XLA call whose temporaries glibc would otherwise hand back to the kernel and
fault in again on every step. A sampling job is one call per batch (the whole loop is one program), so its
commands keep glibc's defaults, which return memory between its different programs (lower peak memory).
"""

from cnc_jax import platform

PLAN = platform.configure_host_malloc()
