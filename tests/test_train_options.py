"""What pod users tune in train.py: lr schedules, gradient clipping, epochs, the profiler, the persistent
compilation cache, the logical-axis rules; and configuration mistakes ending in one error line."""

import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnc_jax import sharding as sh
from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.training.state import make_optimizer, make_schedule
from tests.test_train_cli import lines

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, middle", [("constant", 1.0), ("cosine", 0.5), ("linear", 0.5)])
def test_lr_schedules_warm_up_then_keep_or_decay_to_zero(kind, middle):
    lr = make_schedule(2.0, warmup_steps=10, kind=kind, total_steps=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                               [0.0, 1.0, 2.0, 2.0 * middle, 2.0 if kind == "constant" else 0.0], atol=1e-6)
    if kind != "constant":
        assert lr(35) > lr(60) > lr(85) > 0  # decreasing all the way


def test_lr_schedule_mistakes():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        make_schedule(1.0, kind="exponential")
    with pytest.raises(ValueError, match="none after warmup_steps=10"):
        make_schedule(1.0, warmup_steps=10, kind="cosine", total_steps=10)


def test_grad_clip_norm_scales_gradients_above_the_norm():
    """AdamW's eps (large here) makes the update depend on the gradient's scale, so clipping is visible."""
    params = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
    grads = {"w": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([0.0, 12.0])}  # global norm 13
    clipped, _ = make_optimizer(0.1, eps=1.0, weight_decay=0.0, grad_clip_norm=1.3)
    plain, _ = make_optimizer(0.1, eps=1.0, weight_decay=0.0)

    def update(tx, g):
        return tx.update(g, tx.init(params), params)[0]

    expected = update(plain, jax.tree_util.tree_map(lambda g: g / 10, grads))
    for a, b in zip(jax.tree_util.tree_leaves(update(clipped, grads)), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(update(plain, grads)["b"], expected["b"])
    small = jax.tree_util.tree_map(lambda g: g / 100, grads)  # below the norm: untouched
    np.testing.assert_allclose(update(clipped, small)["b"], update(plain, small)["b"], rtol=1e-6)
    assert optax.tree.norm(grads) == pytest.approx(13.0)


def test_mesh_rules_from_config_text():
    assert sh.parse_rules(sh.rules_text()) == sh.LOGICAL_AXIS_RULES
    rules = dict(sh.parse_rules("conv_out=, dense_out=data+fsdp"))
    assert rules["conv_out"] is None and rules["dense_out"] == ("data", "fsdp") and rules["vocab"] == ("fsdp",)
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4})
    table = sh.parse_rules("conv_out=, dense_out=data+fsdp")
    assert sh.spec_for(("dense_in", "dense_out"), (16, 24), mesh, table) == jax.sharding.PartitionSpec(
        None, ("data", "fsdp"))
    assert sh.spec_for(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 8, 8), mesh, table) == \
        jax.sharding.PartitionSpec(None, None, None, None)
    assert sh.spec_for(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 8, 8), mesh) == \
        jax.sharding.PartitionSpec(None, None, None, "fsdp")
    for bad in ("conv_out=model", "conv_out", "=fsdp"):
        with pytest.raises(ValueError, match="config.mesh.rules"):
            sh.parse_rules(bad)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("options_data")
    write_synthetic(str(base), "train", 24)
    return base


def train_cli(workdir, dataset, *overrides, devices=1):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
            str(workdir), f"--config.data.sources={dataset}:train", "--config.batch_size=8", "--config.log_every=1",
            *overrides]
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, dataset):
    """One run with every option: 1 epoch, linear decay after 1 warmup step, clipping, a profile of step 2,
    its own compilation cache."""
    root = tmp_path_factory.mktemp("options_run")
    proc = train_cli(root / "run", dataset, "--config.num_epochs=1", "--config.lr_schedule=linear",
                     "--config.warmup_steps=1", "--config.grad_clip_norm=0.5", "--config.profile_steps=1",
                     "--config.profile_start=1", f"--config.compile_cache_dir={root / 'cache'}",
                     "--config.record_data_order=True")
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return root


def test_num_epochs_is_one_pass_over_the_data(tuned, dataset):
    uids = [uid for uid, _ in read_captions(SourceSpec(str(dataset), "train").captions_file)[0]]
    steps = len(uids) // 8
    assert [m["step"] for m in lines(tuned / "run" / "metrics.jsonl")] == list(range(1, steps + 1))
    seen = [uid for r in lines(tuned / "run" / "data_order.jsonl") for uid in r["uids"]]
    assert sorted(seen) == sorted(uids)


def test_the_logged_lr_follows_the_schedule(tuned, dataset):
    metrics = lines(tuned / "run" / "metrics.jsonl")
    lr = make_schedule(1e-5, warmup_steps=1, kind="linear", total_steps=len(metrics))
    np.testing.assert_allclose([m["lr"] for m in metrics], [lr(m["step"] - 1) for m in metrics], rtol=1e-6)
    assert metrics[0]["lr"] == 0 and metrics[1]["lr"] == pytest.approx(1e-5) and 0 < metrics[-1]["lr"] < 1e-5


def test_profile_trace_is_written(tuned):
    traces = list((tuned / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_compile_cache_dir_holds_the_train_step(tuned):
    assert list((tuned / "cache").glob("jit_train_step-*"))


@pytest.mark.parametrize("overrides, devices, message", [
    (["--config.data.sources="], 1, "error: no training data"),
    (["--config.data.sources=/nonexistent/tree:train"], 1, "error: config.data: /nonexistent/tree/train_captions.txt"),
    (["--config.mesh.data=3"], 8, "error: mesh data=3 x fsdp=1 does not match the 8 devices"),
    (["--config.random_init=False", "--config.init_checkpoint=/nonexistent/ckpt"], 1, "error: /nonexistent/ckpt"),
    (["--config.batch_size=6"], 4, "error: batch_size 6 is not divisible by the 4 devices"),
    (["--config.mesh.rules=conv_out=model"], 1, "error: config.mesh.rules: 'conv_out=model'"),
    (["--config.lr_schedule=step"], 1, "error: config.lr_schedule must be one of"),
])
def test_configuration_mistakes_end_in_one_error_line(tmp_path, dataset, overrides, devices, message):
    proc = train_cli(tmp_path / "run", dataset, *overrides, devices=devices)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert not (tmp_path / "run").exists()  # nothing written
