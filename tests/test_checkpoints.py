"""Training checkpoints of replicated arrays: saving compiles nothing below the replica-parallel threshold (orbax
otherwise compiles one slice program per array shape), and the state restores exactly."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cnc_jax.training.checkpoints import MIN_REPLICA_SLICE_BYTES

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

