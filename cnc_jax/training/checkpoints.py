"""Training checkpoints: orbax CheckpointManager of {train state, data iterator state}.

Only the train state is saved (trainable params, optimizer state, step, rng); the frozen weights come
from the run's init checkpoint every time, so a save is a fraction of the model. Saves are asynchronous;
restores place every array directly with the shardings of the current mesh, so a run can resume on
another device count. With several processes every process calls save / restore (orbax writes the arrays
jointly, each process its shards) and the JSON item (the data state) is written by process 0.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


class TrainCheckpoints:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        path = epath.Path(directory)
        self.manager = ocp.CheckpointManager(path if "://" in str(directory) else path.absolute(), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict) -> None:
        """data: JSON-able (the data iterator states)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data)))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """abstract_state: jax.ShapeDtypeStruct tree carrying the target shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
