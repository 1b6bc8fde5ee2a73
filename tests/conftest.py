"""Shared test fixtures: the reference folder (CNC_REFERENCE_DIR) and its arrays."""

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole run (and the subprocesses it starts): the suite compiles
# the same tiny programs in several tests and processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnc_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# The test processes (pytest's workers import cnc_jax.cli.train, and the scripts they start) keep glibc's malloc
# defaults, which return memory between the suite's many programs; tests/test_platform.py tests the training
# command's setting in processes of its own.
os.environ.setdefault("CNC_HOST_MALLOC", "system")

REFERENCE_DIR = Path(os.environ.get("CNC_REFERENCE_DIR",
                                    Path(__file__).resolve().parents[1] / ".." / "shared" / "reference")).resolve()


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference folder {REFERENCE_DIR} not found: set CNC_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def ref(ref_dir):
    """ref('cnc_apply_model') -> dict of numpy arrays of that .npz (cached)."""
    cache = {}

    def load(name: str) -> dict:
        if name not in cache:
            with np.load(ref_dir / f"{name}.npz") as f:
                cache[name] = {k: f[k] for k in f.files}
        return cache[name]

    return load


@pytest.fixture(scope="session")
def sched_ref(ref, ref_dir):
    """(arrays of scheduler_ref.npz, scheduler_ref.json): diffusers' samplers on the README's toy model."""
    with open(ref_dir / "scheduler_ref.json") as f:
        return ref("scheduler_ref"), json.load(f)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> the path of a fresh tmpfs of that size ("2m", "64k", ...), unmounted after the test:
    a full disk, for the tests of what every command does when it fills one. Needs root: under CI (which runs as
    root) a failed mount fails the test; elsewhere the test is skipped with the reason."""
    mounts = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            reason = f"cannot mount a tmpfs here (root is needed): {done.stderr.strip()}"
            if os.environ.get("CI"):  # CI runs as root: there a full-disk test that cannot run is a failure
                pytest.fail(reason)
            pytest.skip(reason)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def converted_reference(ref_dir: Path, out: Path, name: str = "tiny_cnc") -> Path:
    """The reference checkpoint `name`.ckpt (with its `name`_config.yaml) converted into `out`."""
    from cnc_jax.cli import convert

    assert convert.main(["convert", str(ref_dir / f"{name}.ckpt"), "--config", str(ref_dir / f"{name}_config.yaml"),
                         "--out", str(out)]) == 0
    return out


def synthetic_train_source(tmp_path_factory, records: int = 24) -> str:
    """A synthetic training set (`prepare synthetic`) as a config.data.sources entry "BASE:train"."""
    from cnc_jax.prep.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(base), "train", records)
    return f"{base}:train"


def tiny_train_config(source: str, **overrides):
    """The tiny stage config the train tests share: global batch 8 (divisible by the 8 simulated devices, so every
    test shares one program), a step's metrics logged and its uids recorded, a checkpoint every 3 steps."""
    from cnc_jax.configs import tiny

    config = tiny.get_config()
    config.data.sources = source
    config.batch_size = 8
    config.record_data_order = True
    config.log_every = 1
    config.checkpoint_every = 3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs| — the parity measure used across the suite."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ---- parity bookkeeping: every comparison is recorded; the worst per group is printed at the end ----
# Records travel on the test reports (user_properties), so the summary also sees those of pytest-xdist workers.
PARITY: list[tuple[str, str, float]] = []  # this process's comparisons
SHIPPED = 0  # how many of them are already on a report
REPORTED: list[tuple[str, str, float]] = []  # every comparison of the run, gathered from the reports
PARITY_TOLERANCE = 1e-4


def check_parity(group: str, name: str, ours, theirs, tol: float = PARITY_TOLERANCE) -> float:
    """Assert rel_err(ours, theirs) <= tol and record it under `group` for the summary."""
    err = rel_err(ours, theirs)
    PARITY.append((group, name, err))
    assert err <= tol, f"{group}/{name}: relative error {err:.3e} > {tol:.0e}"
    return err


@pytest.fixture(autouse=True)
def _ship_parity_records(request):
    """After each test, put the comparisons made since the last one (its module fixtures' too) on its report."""
    global SHIPPED
    yield
    request.node.user_properties.extend(("parity", record) for record in PARITY[SHIPPED:])
    SHIPPED = len(PARITY)


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        REPORTED.extend(tuple(value) for key, value in report.user_properties if key == "parity")


def run_main(main, capsys, *argv):
    """(exit status, stdout, stderr) of a command's main() called in-process with `argv` (any objects, as str)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err

def pytest_terminal_summary(terminalreporter):
    if not REPORTED:
        return
    worst: dict[str, tuple[str, float, int]] = {}
    for group, name, err in REPORTED:
        prev = worst.get(group)
        count = (prev[2] if prev else 0) + 1
        worst[group] = (name, err, count) if prev is None or err > prev[1] else (prev[0], prev[1], count)
    terminalreporter.section("parity vs reference (fp32, worst relative error per group)")
    for group in sorted(worst):
        name, err, count = worst[group]
        terminalreporter.write_line(f"{group:<40} {err:.2e}  ({name}; {count} arrays)")
