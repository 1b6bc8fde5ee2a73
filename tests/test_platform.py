"""The host allocator setting the training command applies (cnc_jax.platform.configure_host_malloc)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnc_jax import platform

ROOT = Path(__file__).resolve().parents[1]

# A program whose temporaries (~1.1 GB per call at 2048², in XLA buffers above every glibc mmap threshold) are
# fresh pages on each call unless freed memory is kept: the minor page faults per call tell the two apart.
FAULTS_PER_CALL = r"""
import json, resource
from cnc_jax.cli.host_memory import PLAN
import jax, jax.numpy as jnp

@jax.jit
def chain(x):
    for _ in range(4):
        x = jnp.tanh((x @ x.T) @ x) * 1.5 + jnp.sin(x)
    return x.sum()

x = jnp.ones((2048, 2048), jnp.float32)
chain(x).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    chain(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"plan": PLAN, "faults": faults}))
"""


def _run(args: list, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CNC_HOST_MALLOC", "GLIBC_TUNABLES")}
    environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.mark.parametrize("environ, plan", [
    ({"JAX_PLATFORMS": "cpu"}, "retain"),
    ({"JAX_PLATFORMS": "cpu", "CNC_HOST_MALLOC": "system"}, "system"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, "accelerator"),
    ({"JAX_PLATFORMS": "cuda", "CNC_HOST_MALLOC": "retain"}, "retain"),
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "GLIBC_TUNABLES"),
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}, "retain"),
])
def test_host_malloc_plan(environ, plan):
    assert platform.host_malloc_plan(environ) == plan


def test_host_malloc_plan_rejects_unknown_mode():
    with pytest.raises(ValueError, match="CNC_HOST_MALLOC='fast'"):
        platform.host_malloc_plan({"CNC_HOST_MALLOC": "fast"})


def test_train_with_a_bad_mode_is_one_error_line_and_status_2():
    done = _run(["train.py", "--help"], CNC_HOST_MALLOC="fast")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: CNC_HOST_MALLOC='fast': must be one of auto, retain, system"]


@pytest.mark.slow
def test_training_host_memory_keeps_freed_memory_for_the_next_call():
    """The training command's allocator setting on a CPU host makes repeated XLA calls reuse their pages; with
    CNC_HOST_MALLOC=system every call faults its temporaries in again."""
    kept, system = (_run(["-c", FAULTS_PER_CALL], CNC_HOST_MALLOC=mode) for mode in ("auto", "system"))
    assert kept.returncode == 0 and system.returncode == 0, kept.stderr[-2000:] + system.stderr[-2000:]
    kept, system = json.loads(kept.stdout), json.loads(system.stdout)
    assert (kept["plan"], system["plan"]) == ("retain", "system")
    assert min(system["faults"]) >= 2 * 2048 * 2048 * 4 // 4096, system  # at least two 16 MB buffers per call
    # a few calls may still grow the heap while its free chunks settle (a fragment split off by a small allocation)
    assert sum(kept["faults"]) < sum(system["faults"]) / 10, (kept, system)
