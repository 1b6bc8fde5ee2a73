"""Training checkpoints of replicated arrays: saving compiles nothing below the replica-parallel threshold (orbax
otherwise compiles one slice program per array shape), and the state restores exactly. Every step records the
run's metadata where plain orbax finds it, and checkpoints of the unnamed (optax.adamw tuple) optimizer state
still resume."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cnc_jax.training import checkpoints
from cnc_jax.training.checkpoints import MIN_REPLICA_SLICE_BYTES, TrainCheckpoints, abstract_with_shardings
from cnc_jax.training.state import TrainState, make_optimizer, named_opt_state

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from cnc_jax.training import checkpoints

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {f"w{i}": jax.device_put(jnp.arange(8 * (i + 1), dtype=jnp.float32).reshape(8, i + 1), replicated)
             for i in range(12)}
    jax.block_until_ready(state)
    store = checkpoints.TrainCheckpoints(sys.argv[1], async_save=False,
                                         min_replica_slice_bytes=int(sys.argv[2]))
    before = len(compiles)
    store.save(1, state, {"note": "x"})
    store.wait()
    saved = len(compiles) - before
    abstract = checkpoints.abstract_with_shardings(state, jax.tree_util.tree_map(lambda _: replicated, state))
    restored, data = store.restore(1, abstract)
    store.close()
    assert data == {"note": "x"}
    for k in state:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
        assert restored[k].sharding == replicated
    print("compiles during save:", saved)
""")


def run(tmp_path, threshold: int) -> int:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / f"ckpt{threshold}"), str(threshold)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().rsplit(" ", 1)[1])


def test_saving_small_replicated_arrays_compiles_nothing(tmp_path):
    assert run(tmp_path, MIN_REPLICA_SLICE_BYTES) == 0
    assert run(tmp_path, 0) > 0  # orbax's replica-parallel split: what the threshold avoids



def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.asarray(rng.standard_normal(3),
                                                                                           jnp.float32)}


def _step(tx, state: TrainState, seed: int) -> TrainState:
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1 * (seed + 1)) - x, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def _on_one_device(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract_with_shardings(state, jax.tree_util.tree_map(lambda _: device, state))


def test_every_step_records_the_run_metadata_for_plain_orbax(tmp_path):
    """What the trainer passes as `metadata` is the step's orbax custom_metadata (_CHECKPOINT_METADATA)."""
    tx, _ = make_optimizer(1e-3)
    state = TrainState.create(_params(), tx, jax.random.PRNGKey(0))
    record = {"model": {"name": "tiny", "unet": {"channels": [32, 64]}}, "cnc_jax_version": "9.9",
              "frozen_fingerprint": "abc"}
    store = TrainCheckpoints(str(tmp_path / "ckpt"), async_save=False, metadata=record)
    store.save(1, state, {"iterators": []})
    store.close()
    assert json.loads((tmp_path / "ckpt" / "1" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"] == record
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                                      "data": ocp.JsonCheckpointHandler()})
    assert manager.metadata(1).custom_metadata == record
    saved = manager.metadata(1).item_metadata["state"].tree["opt_state"]
    assert set(saved) == {"scale_by_adam", "add_decayed_weights", "scale_by_learning_rate"}
    assert set(saved["scale_by_adam"]) == {"count", "mu", "nu"}
    manager.close()


def test_package_version_from_the_distribution_else_pyproject(monkeypatch):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    for version, expected in ((missing, pyproject), (lambda name: "7.1.2", "7.1.2")):
        monkeypatch.setattr(importlib.metadata, "version", version)
        checkpoints.package_version.cache_clear()
        assert checkpoints.package_version() == expected
    checkpoints.package_version.cache_clear()


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_a_checkpoint_of_the_unnamed_optimizer_state_resumes_bit_identically(tmp_path, clip):
    """Checkpoints written before the stages were named hold optax.adamw's tuple (opt_state/0/mu/...): they restore
    into the named state and the next steps equal those of the run that wrote them."""
    old_tx = optax.adamw(optax.constant_schedule(1e-2), weight_decay=0.01)
    if clip:
        old_tx = optax.chain(optax.clip_by_global_norm(clip), old_tx)
    tx, _ = make_optimizer(1e-2, grad_clip_norm=clip)
    old = TrainState.create(_params(), old_tx, jax.random.PRNGKey(0))
    for seed in range(2):
        old = _step(old_tx, old, seed)
    store = TrainCheckpoints(str(tmp_path / "ckpt"), async_save=False)
    store.save(2, old, {"iterators": []})
    abstract = _on_one_device(jax.eval_shape(lambda: TrainState.create(_params(), tx, jax.random.PRNGKey(0))))
    restored, _ = store.restore(2, abstract)
    store.close()
    assert tuple(restored.opt_state) == tuple(abstract.opt_state)  # named, in the optimizer's order
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, named_opt_state(old.opt_state))
    for seed in range(2, 4):
        old, restored = _step(old_tx, old, seed), _step(tx, restored, seed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, old.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, named_opt_state(old.opt_state))
