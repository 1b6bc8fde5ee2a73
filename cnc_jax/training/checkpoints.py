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

Failures say one thing once: a save that cannot write (full disk, read-only folder) raises one OSError naming the
file, and orbax's own error records of it (the same traceback logged from up to five of its threads) go to the
`error_log` file instead of the console (cnc_jax.checkpoint.library_errors.LibraryLog); a restore of a damaged step
raises, and what orbax logs about it goes there too (the trainer reports the step in one line:
cnc_jax.training.trainer.resume).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import tomllib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from cnc_jax.checkpoint.library_errors import LibraryLog, library_os_error
from cnc_jax.training.state import named_opt_state, unnamed_opt_state

MIN_REPLICA_SLICE_BYTES = 16 << 20
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name of a step folder being written: N.orbax-checkpoint-tmp


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
    the primary process only, so the other processes may pass None. max_to_keep >= 1 (orbax reads 0 as "keep
    none" and deletes each checkpoint as soon as it is written), None keeps every step. error_log: a local file
    that receives orbax's error records while this is open (cnc_jax.checkpoint.library_errors.LibraryLog); None
    leaves them on the console.
    A partial step folder (N.orbax-checkpoint-tmp) of a crashed save is removed when the next one opens."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
                 min_replica_slice_bytes: int = MIN_REPLICA_SLICE_BYTES, metadata: dict | None = None,
                 error_log: str | None = None):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be an integer >= 1 (or None: keep every step), got {max_to_keep!r}:"
                             " orbax would delete every checkpoint as soon as it is saved")
        self.metadata, self.error_log, self.failed = metadata, error_log, False
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        path = epath.Path(directory)
        self.directory = path if "://" in str(directory) else path.absolute()
        self.errors = LibraryLog(error_log, level=logging.ERROR).open() if error_log else None
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={"state": _state_handler(min_replica_slice_bytes),
                                                            "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict) -> None:
        """data: JSON-able (the data iterator states). Asynchronous: a write error surfaces (as OSError) here at a
        later save, or in wait / close."""
        with self._disk_errors(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                            data=ocp.args.JsonSave(data)),
                              custom_metadata=self.metadata)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """abstract_state: jax.ShapeDtypeStruct tree carrying the target shardings. A checkpoint whose optimizer
        state is optax.adamw's unnamed tuple (written before the names) restores into that layout, then named.
        A damaged step raises (any exception: orbax's and tensorstore's vary with what is missing)."""
        with self.errors.at(logging.WARNING) if self.errors else contextlib.nullcontext():
            saved = self.manager.metadata(step).item_metadata.get("state")
            if saved is None:
                raise FileNotFoundError(f"{self.directory / str(step) / 'state' / '_METADATA'} is missing or "
                                        "unreadable")
            legacy = isinstance(saved.tree, dict) and isinstance(saved.tree.get("opt_state"), (list, tuple))
            target = abstract_state.replace(opt_state=unnamed_opt_state(abstract_state.opt_state)) if legacy \
                else abstract_state
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(target,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                data=ocp.args.JsonRestore()))
        state = restored["state"]
        if legacy:
            state = state.replace(opt_state=named_opt_state(state.opt_state))
        return state, restored["data"]

    def set_aside(self, step: int, prefix: str) -> str:
        """Rename checkpoints/N to checkpoints/<prefix>-N (a name orbax does not read as a step; -2, -3, ...
        appended if taken) and return the new name. Call it on one process, then `reload` on every process."""
        name = f"{prefix}-{step}"
        for n in range(2, 1000):
            if not (self.directory / name).exists():
                break
            name = f"{prefix}-{step}-{n}"
        (self.directory / str(step)).rename(self.directory / name)
        return name

    def reload(self) -> None:
        """Re-read the steps on disk (after set_aside)."""
        self.manager.reload()

    def wait(self) -> None:
        with self._disk_errors(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save, then close. After a save that could not write, one process removes the partial
        step folders (N.orbax-checkpoint-tmp) now: on a full disk they hold what space there was."""
        try:
            with self._disk_errors(None):
                try:
                    self.manager.wait_until_finished()
                finally:
                    self.manager.close()
        finally:
            if self.failed and jax.process_count() == 1:  # several processes: orbax's cleanup at the next start
                for partial in self.directory.glob(f"*{TMP_SUFFIX}*"):
                    with contextlib.suppress(OSError):
                        partial.rmtree()
            if self.errors:
                self.errors.close(failed=self.failed)

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None):
        """An orbax save failure that is an I/O error -> one OSError naming the file (and the error log)."""
        try:
            yield
        except Exception as e:
            log = f"; orbax's log: {self.errors.path}" if self.errors and self.errors.written else ""
            note = f" (saving checkpoints in {self.directory}{log})"
            error = library_os_error(e, str(self.directory if step is None else self.directory / str(step)), note)
            if error is None:
                raise
            self.failed = True
            raise error from None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
