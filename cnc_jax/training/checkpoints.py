"""Training checkpoints: orbax CheckpointManager of {train state, data iterator state}.

Only the train state is saved (trainable params, optimizer state, step, rng); the frozen weights come
from the run's init checkpoint every time, so a save is a fraction of the model. Saves are asynchronous;
restores place every array directly with the shardings of the current mesh, so a run can resume on
another device count. With several processes every process calls save / restore (orbax writes the arrays
jointly, each process its shards) and the JSON item (the data state) is written by process 0.

Replicated arrays are split between their replicas for writing (orbax's replica-parallel save) only when each
replica's slice is at least `min_replica_slice_bytes` (default MIN_REPLICA_SLICE_BYTES): the split is one small compiled slice per array shape, and
for the many small leaves of a model those compiles cost more than the write (17 of the 25 s of saving the tiny
model's state replicated on 8 devices).

Every step also carries the run's record in orbax's step metadata (`custom_metadata` of checkpoints/N/
_CHECKPOINT_METADATA: the model config, the init checkpoint and its frozen weights' fingerprint, the cnc_jax
version), so plain orbax reads a checkpoint without this package (README "Train").
"""

from __future__ import annotations

import functools
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from cnc_jax.training.state import named_opt_state, unnamed_opt_state

MIN_REPLICA_SLICE_BYTES = 16 << 20


def _state_handler(min_replica_slice_bytes: int) -> ocp.PyTreeCheckpointHandler:
    """orbax's default handlers with that threshold for jax.Arrays. (The default array handler also keeps a
    per-array metadata store, which only matters for typed PRNG key arrays; the train state holds none.)"""
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_replica_slice_bytes)
    registry = ocp.type_handlers.create_type_handler_registry(
        *[(ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
          for ty in ocp.type_handlers.supported_types()])
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


@functools.lru_cache(maxsize=None)
def package_version() -> str:
    """cnc_jax's version: the installed distribution's, else (a source checkout) pyproject.toml's [project]
    version; "unknown" without either."""
    try:
        return importlib.metadata.version("cnc_jax")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return "unknown"
    return str(project.get("version", "unknown"))


class TrainCheckpoints:
    """metadata: JSON-able, written into every step's orbax metadata (`custom_metadata`); orbax writes it from
    the primary process only, so the other processes may pass None."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 min_replica_slice_bytes: int = MIN_REPLICA_SLICE_BYTES, metadata: Optional[dict] = None):
        self.metadata = metadata
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        path = epath.Path(directory)
        self.manager = ocp.CheckpointManager(path if "://" in str(directory) else path.absolute(), options=options,
                                             item_handlers={"state": _state_handler(min_replica_slice_bytes),
                                                            "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict) -> None:
        """data: JSON-able (the data iterator states)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        data=ocp.args.JsonSave(data)),
                          custom_metadata=self.metadata)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """abstract_state: jax.ShapeDtypeStruct tree carrying the target shardings. A checkpoint whose optimizer
        state is optax.adamw's unnamed tuple (written before the names) restores into that layout, then named."""
        saved = self.manager.metadata(step).item_metadata["state"].tree
        legacy = isinstance(saved, dict) and isinstance(saved.get("opt_state"), (list, tuple))
        target = abstract_state.replace(opt_state=unnamed_opt_state(abstract_state.opt_state)) if legacy \
            else abstract_state
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        if legacy:
            state = state.replace(opt_state=named_opt_state(state.opt_state))
        return state, restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
