"""train.py on the tiny config with a synthetic dataset: resume, 1 vs 8 devices, SIGTERM, non-finite loss; the
checkpoints read with plain orbax (README "Train") and without a logged warning; compile time kept out of the
throughput."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnc_jax.checkpoint.run_folder import RUN_INFO, restore_trainable
from cnc_jax.cli import train
from cnc_jax.configs import tiny
from cnc_jax.training import trainer
from cnc_jax.training.checkpoints import TrainCheckpoints, abstract_with_shardings, package_version
from tests.conftest import synthetic_train_source, tiny_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_train_source(tmp_path_factory)


tiny_config = tiny_train_config


def params_at(workdir, step=None) -> tuple[int, dict]:
    """(step, trainable params as numpy) of a run's checkpoint (default: the latest)."""
    root = Path(workdir, "checkpoints")
    step = step or max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    return step, restore_trainable(str((root / str(step) / "state").resolve()))


def state_at(workdir, step) -> dict:
    """The whole train state of a one-device run's checkpoint (params, named optimizer state, step, rng)."""
    store = TrainCheckpoints(str(Path(workdir, "checkpoints")))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = store.manager.metadata(step).item_metadata["state"].tree
    abstract = abstract_with_shardings(tree, jax.tree_util.tree_map(lambda _: device, tree))
    state = store.restore(step, abstract)[0]
    store.close()
    return state


def absl_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_trees(a, b, rtol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=0 if rtol == 0 else 1e-7)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dataset):
    """6 uninterrupted steps on one device (checkpoints at 3 and 6)."""
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train(tiny_config(dataset, num_steps=6, image_log_every=6, image_log_steps=2), str(workdir))
    return workdir


def test_image_log(straight):
    """The official log: reconstruction, fg depth, bg depth, mask and guided samples of 4 images, one row each."""
    from PIL import Image

    grid = np.asarray(Image.open(straight / "images" / "step_0000006.png"))
    assert grid.shape == (5 * 64, 4 * 64, 3)
    assert len({grid[r * 64:(r + 1) * 64].tobytes() for r in range(5)}) == 5


def test_stop_and_resume_equals_a_straight_run(tmp_path, dataset, straight, caplog):
    resumed = tmp_path / "resumed"
    trainer.train(tiny_config(dataset, num_steps=3), str(resumed))
    assert params_at(resumed)[0] == 3
    caplog.set_level(logging.WARNING)
    caplog.clear()
    trainer.train(tiny_config(dataset, num_steps=6), str(resumed))  # a new run in the same workdir resumes
    assert absl_warnings(caplog) == []
    (step_a, params_a), (step_b, params_b) = params_at(straight), params_at(resumed)
    assert step_a == step_b == 6
    assert_trees(params_a, params_b)  # bit-identical
    state_a, state_b = state_at(straight, 6), state_at(resumed, 6)
    assert set(state_a["opt_state"]) == {"scale_by_adam", "add_decayed_weights", "scale_by_learning_rate"}
    assert_trees(state_a, state_b)  # the named optimizer state too
    assert lines(straight / "data_order.jsonl") == lines(resumed / "data_order.jsonl")
    assert len({tuple(x["uids"]) for x in lines(straight / "data_order.jsonl")}) == 6


def _run_subprocess(workdir, dataset, *overrides, devices=1, wait=True):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
            str(workdir), f"--config.data.sources={dataset}", "--config.batch_size=8", "--config.log_every=1",
            *overrides]
    if wait:
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_device_vs_eight_devices(tmp_path, dataset, straight):
    eight = tmp_path / "eight"
    proc = _run_subprocess(eight, dataset, "--config.num_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                           "--config.record_data_order=True", devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info_one, info_eight = (json.loads((d / "run_info.json").read_text()) for d in (straight, eight))
    assert info_eight["devices"] == 8 and info_eight["mesh"] == {"data": 2, "fsdp": 4}
    # fsdp=4 stores about a quarter of the trainable params + optimizer state per device
    ratio = info_eight["trainable_and_optimizer_bytes_per_device"] / info_one["trainable_and_optimizer_bytes_per_device"]
    print(f"trainable+optimizer bytes per device: 1 device {info_one['trainable_and_optimizer_bytes_per_device']}, "
          f"8 devices (data=2, fsdp=4) {info_eight['trainable_and_optimizer_bytes_per_device']} (ratio {ratio:.3f})")
    assert ratio < 0.4, ratio
    one_losses = [m["loss"] for m in lines(straight / "metrics.jsonl")][:3]
    np.testing.assert_allclose([m["loss"] for m in lines(eight / "metrics.jsonl")], one_losses, rtol=1e-5)
    assert lines(eight / "data_order.jsonl") == lines(straight / "data_order.jsonl")[:3]
    assert_trees(params_at(straight, 3)[1], params_at(eight)[1], rtol=1e-5)
    # the 8-device checkpoint resumes on this single device
    assert trainer.train(tiny_config(dataset, num_steps=4), str(eight))["step"] == 4


def test_sigterm_saves_a_final_checkpoint(tmp_path, dataset, straight):
    workdir = tmp_path / "run"
    proc = _run_subprocess(workdir, dataset, "--config.num_steps=100000", "--config.checkpoint_every=100000",
                           wait=False)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    step, _ = params_at(workdir)
    assert step >= 3 and step == lines(metrics)[-1]["step"]


def test_non_finite_loss_stops_with_step_and_uids(tmp_path, dataset, straight, monkeypatch):
    """A batch that turns the loss non-finite (here: a NaN pixel in step 4's batch) stops the run, naming the
    step and the batch's uids, with nothing saved after it."""
    make_iterator = trainer.make_iterator

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.count, self.uids = inner, 0, None

        def __next__(self):
            batch = next(self.inner)
            if self.count == 4:
                batch["image"][0, 0, 0, 0] = np.nan
                self.uids = [u.decode() for u in batch["uid"]]
            self.count += 1
            return batch

        def __getattr__(self, name):
            return getattr(self.inner, name)

    poisoned = []
    monkeypatch.setattr(trainer, "make_iterator", lambda *a, **k: poisoned.append(Poisoned(make_iterator(*a, **k)))
                        or poisoned[-1])
    with pytest.raises(trainer.NonFiniteLoss, match=r"at step 4 \(batch uids: ") as info:
        trainer.train(tiny_config(dataset, num_steps=6, checkpoint_every=1), str(tmp_path / "run"))
    assert all(uid in info.value.args[0] for uid in poisoned[0].uids)
    step, params = params_at(tmp_path / "run")
    assert step == 4  # steps 1..4 were saved; the bad step 5 (index 4) and later were not
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("field", train.CONFIG_FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_config_floats_are_refused_by_name(field, value):
    config = tiny.get_config()
    train.check_config_numbers(config)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"config.{field}: expected a finite number"):
        train.check_config_numbers(config)


def test_nan_learning_rate_is_one_error_line_and_exit_2(tmp_path):
    result = _run_subprocess(tmp_path / "run", "unused:train", "--config.learning_rate=nan")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert "config.learning_rate: expected a finite number, got nan" in result.stderr
    assert not (tmp_path / "run").exists()


def _readme_python_block(marker: str) -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(re.escape(marker) + r".*?-->\n```python\n(.*?)^```", readme, re.M | re.S)
    assert block, f"README lost its block {marker}"
    return block.group(1)


def test_plain_orbax_reads_a_train_checkpoint(straight, tmp_path, monkeypatch, caplog):
    """README "Train"'s plain-orbax block, run as written on a run folder: the step's metadata holds the model
    config, the version and the frozen weights' fingerprint, the optimizer state is named, nothing is logged or
    warned."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(straight)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    scope = {}
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        exec(_readme_python_block("<!-- plain orbax:"), scope)
    assert absl_warnings(caplog) == [] and [str(w.message) for w in warned] == []
    run_info = json.loads((straight / RUN_INFO).read_text())
    info = scope["info"]
    assert info["model"] == run_info["model"] and info["model"]["unet"]
    assert info["frozen_fingerprint"] == run_info["frozen_fingerprint"]
    assert info["cnc_jax_version"] == package_version()
    assert scope["step"] == 6 and int(scope["state"]["step"]) == 6
    assert set(scope["adam"]) == {"count", "mu", "nu"}
    assert_trees(scope["adam"]["mu"], state_at(straight, 6)["opt_state"]["scale_by_adam"]["mu"])
    assert_trees(scope["state"]["params"], params_at(straight, 6)[1])
    assert scope["data"]["iterators"] and scope["data"]["global_batch"] == 8


def test_loading_a_run_folder_logs_no_warning(straight, caplog):
    """sample.py / export read a run folder's params through restore_trainable: no absl warning (it used to read
    checkpoints/N/state as a Checkpointer step folder and log that its _CHECKPOINT_METADATA was missing)."""
    caplog.set_level(logging.WARNING)
    params = restore_trainable(str(straight / "checkpoints" / "6" / "state"))
    assert absl_warnings(caplog) == []
    assert_trees(params, state_at(straight, 6)["params"])


class FakeClock:
    """The trainer's clock: still, except where the fake step advances it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class SlowStep:
    """The train step as if compiling took 1000 s and each step 1 s: `.lower().compile()` costs the 1000 s; a
    step run without that (jit compiling in its first call) costs them in its first call."""

    def __init__(self, fn, clock, compiled=False):
        self.fn, self.clock, self.compiled = fn, clock, compiled

    def lower(self, *args):
        lowered = self.fn.lower(*args)

        def compile():
            self.clock.now += 1000.0
            return SlowStep(lowered.compile(), self.clock, compiled=True)

        return types.SimpleNamespace(compile=compile)

    def __call__(self, *args):
        if not self.compiled:
            self.clock.now += 1000.0
            self.compiled = True
        self.clock.now += 1.0
        return self.fn(*args)


def test_throughput_leaves_the_compilation_out(tmp_path, dataset, monkeypatch):
    """The first metrics line carries compile_secs, and its steps/s and examples/s come from the steps after the
    compilation only (one line per step: 1 step/s, 8 examples/s), in metrics.jsonl and TensorBoard alike."""
    clock, program = FakeClock(), trainer._program
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=clock.perf_counter,
                                                               time=clock.perf_counter))
    monkeypatch.setattr(trainer, "_program", lambda *a: (SlowStep(program(*a)[0], clock), *program(*a)[1:]))
    workdir = tmp_path / "run"
    trainer.train(tiny_config(dataset, num_steps=3), str(workdir))
    first, *rest = lines(workdir / "metrics.jsonl")
    assert first["compile_secs"] == 1000.0 and not any("compile_secs" in record for record in rest)
    for record in (first, *rest):
        assert (record["steps_per_sec"], record["examples_per_sec"]) == (1.0, 8.0)
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/compile_secs")] == [(1, 1000.0)]
    assert [e.value for e in events.Scalars("train/steps_per_sec")] == [1.0, 1.0, 1.0]
