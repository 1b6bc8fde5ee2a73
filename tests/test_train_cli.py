"""train.py on the tiny config with a synthetic dataset: resume, 1 vs 8 devices, SIGTERM, non-finite loss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnc_jax.cli import train
from cnc_jax.configs import tiny
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.training import trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(base), "train", 24)
    return f"{base}:train"


def tiny_config(dataset, **overrides):
    config = tiny.get_config()
    config.data.sources = dataset
    config.batch_size = 8  # divisible by the 8 simulated devices; every test shares this one program
    config.record_data_order = True
    config.log_every = 1
    config.checkpoint_every = 3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def params_at(workdir, step=None) -> tuple[int, dict]:
    """(step, trainable params) of a run's checkpoint (default: the latest), restored onto the first device."""
    import jax

    root = Path(workdir, "checkpoints")
    step = step or max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    path = str((root / str(step) / "state").resolve())
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    checkpointer.metadata(path).item_metadata.tree)
    return step, checkpointer.restore(path, target)["params"]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_trees(a, b, rtol=0.0):
    import jax

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


def test_stop_and_resume_equals_a_straight_run(tmp_path, dataset, straight):
    resumed = tmp_path / "resumed"
    trainer.train(tiny_config(dataset, num_steps=3), str(resumed))
    assert params_at(resumed)[0] == 3
    trainer.train(tiny_config(dataset, num_steps=6), str(resumed))  # a new run in the same workdir resumes
    (step_a, params_a), (step_b, params_b) = params_at(straight), params_at(resumed)
    assert step_a == step_b == 6
    assert_trees(params_a, params_b)  # bit-identical
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
    import jax

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
