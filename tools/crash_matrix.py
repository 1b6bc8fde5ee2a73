"""The crash matrix of train.py: kill a tiny-config run at several moments, resume it, and check that the result is
bit-identical to an uninterrupted run (every leaf of the train state, every step once in metrics.jsonl, the same
data order).

  python tools/crash_matrix.py [--steps 8] [--out DIR]

Moments: SIGKILL during setup (before the first step), SIGKILL mid-step (after a few logged steps), SIGKILL
mid-checkpoint (as soon as orbax's temporary step folder appears), SIGTERM (a final checkpoint, exit 0), SIGKILL
twice in a row. Minutes on 2 cores (each run compiles the tiny step; the XLA cache is shared between them). Prints
one line per case and exits 1 if any case differs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.training.checkpoints import TrainCheckpoints, abstract_with_shardings

REPO = Path(__file__).resolve().parents[1]


def train_process(workdir: Path, dataset: str, steps: int) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "train.py"), "--config", "tiny", "--workdir", str(workdir),
            f"--config.data.sources={dataset}", "--config.batch_size=4", "--config.log_every=1",
            "--config.checkpoint_every=2", f"--config.num_steps={steps}", "--config.record_data_order=True",
            "--config.image_log_every=0"]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> None:
    out, err = proc.communicate(timeout=900)
    if proc.returncode:
        raise SystemExit(f"{what}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")


def metric_lines(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, timeout: float = 600, every: float = 0.01) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def saving(workdir: Path) -> bool:
    """orbax's temporary folder of a step being written (renamed to the step's number when complete)."""
    root = workdir / "checkpoints"
    return root.is_dir() and any("tmp" in p.name for p in root.iterdir())


def state_at(workdir: Path, step: int):
    store = TrainCheckpoints(str(workdir / "checkpoints"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = store.manager.metadata(step).item_metadata["state"].tree
    state = store.restore(step, abstract_with_shardings(tree, jax.tree_util.tree_map(lambda _: device, tree)))[0]
    store.close()
    return state


def compare(reference: Path, workdir: Path, steps: int) -> str:
    """'' when the run equals the reference, else what differs."""
    a, b = jax.tree_util.tree_leaves(state_at(reference, steps)), jax.tree_util.tree_leaves(state_at(workdir, steps))
    differing = sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    problems = []
    if differing:
        problems.append(f"{differing} of {len(a)} leaves differ")
    if logged != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps {logged}")
    if (reference / "data_order.jsonl").read_text() != (workdir / "data_order.jsonl").read_text():
        problems.append("data_order.jsonl differs")
    return "; ".join(problems) or f"{len(a)} of {len(a)} leaves equal, every step logged once"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="crash_matrix_"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla_cache"))
    write_synthetic(str(out / "data"), "train", 24)
    dataset = f"{out / 'data'}:train"
    reference = out / "straight"
    finish(train_process(reference, dataset, args.steps), "the uninterrupted run")

    def kill_when(condition, sig=signal.SIGKILL):
        def interrupt(workdir):
            proc = train_process(workdir, dataset, args.steps)
            if not wait_for(lambda: condition(workdir) or proc.poll() is not None):
                raise SystemExit(f"{workdir.name}: the moment never came")
            proc.send_signal(sig)
            proc.communicate(timeout=900)
            return proc.returncode
        return interrupt

    cases = {
        "SIGKILL during setup": [kill_when(lambda w: (w / "run_model.json").exists())],
        "SIGKILL mid-step": [kill_when(lambda w: metric_lines(w) >= 3)],
        "SIGKILL mid-checkpoint": [kill_when(saving)],
        "SIGTERM": [kill_when(lambda w: metric_lines(w) >= 3, signal.SIGTERM)],
        "SIGKILL twice": [kill_when(lambda w: metric_lines(w) >= 2), kill_when(lambda w: metric_lines(w) >= 5)],
    }
    failed = 0
    for name, interrupts in cases.items():
        workdir = out / name.replace(" ", "_").lower()
        codes = [interrupt(workdir) for interrupt in interrupts]
        finish(train_process(workdir, dataset, args.steps), f"{name}: the resumed run")
        result = compare(reference, workdir, args.steps)
        ok = "differ" not in result and "steps [" not in result
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: interrupted run exit {codes}; resumed: {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
