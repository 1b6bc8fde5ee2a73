"""The files of a train.py run folder: its RUN_INFO record and the trainable params of its orbax checkpoints.

Train checkpoints hold only the trainable parameters and the optimizer state; the frozen weights are those the
run started from. So train.py records, once, what is needed to put the whole model back together
(RUN_INFO = run_model.json: the resolved model config, the init checkpoint's absolute path or the random-init
seed, sd_locked, the tokenizer, and a fingerprint of the frozen weights it trained with);
cnc_jax.checkpoint.weights.load_run merges the two, refusing an init checkpoint that changed since.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict

from cnc_jax.checkpoint.library_errors import LibraryLog, short_reason
from cnc_jax.io import write_atomic
from cnc_jax.model_config import CnCConfig

RUN_INFO = "run_model.json"
RUN_FORMAT = "cnc_jax-run/1"


class RunError(ValueError):
    """A run folder cannot be turned into a model; the message names the folder, file or step."""


def is_run_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, RUN_INFO))


def fingerprint(tree: dict) -> str:
    """A hash of every leaf (path, dtype, shape, bytes): tells whether two weight sets are the same."""
    digest = hashlib.blake2b(digest_size=16)
    for path, value in sorted(flatten_dict(tree).items()):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{'/'.join(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def record_run(workdir: str, config, model_config: CnCConfig, frozen: dict) -> dict:
    """Write RUN_INFO (what export needs) from the train config and the frozen weights the run uses; returns it
    (the trainer also puts it into every checkpoint's metadata)."""
    tokenizer = config.tokenizer
    if tokenizer and tokenizer != "byte_level":
        tokenizer = os.path.abspath(tokenizer)
    info = {"format": RUN_FORMAT, "model": model_config.to_dict(),
            "init_checkpoint": os.path.abspath(config.init_checkpoint) if config.init_checkpoint else "",
            "random_init": bool(config.random_init), "seed": int(config.seed), "sd_locked": bool(config.sd_locked),
            "tokenizer": tokenizer, "frozen_fingerprint": fingerprint(frozen)}
    write_atomic(os.path.join(workdir, RUN_INFO), json.dumps(info, indent=1).encode())
    return info


def read_run_info(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{run_dir}: no {RUN_INFO} (a run folder written by this version of train.py has one)") \
            from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None
    if info.get("format") != RUN_FORMAT:
        raise RunError(f"{path}: format {info.get('format')!r}, expected {RUN_FORMAT!r}")
    return info


def run_steps(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def restore_trainable(path: str) -> dict:
    """The `params` of a saved TrainState as host numpy arrays, whatever mesh the run used; the optimizer state
    (twice the trainable parameters) is never read. `path` is a CheckpointManager item folder (checkpoints/N/state):
    it is read with the item's own handler, as the manager does. (A Checkpointer would look for the step's
    _CHECKPOINT_METADATA inside it, which the manager writes one level up, and log that it is missing.)"""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with LibraryLog():
            tree = handler.metadata(epath.Path(path)).tree
            target = {"params": jax.tree_util.tree_map(lambda _: np.zeros((), np.float32), tree["params"])}
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
    # a missing _METADATA (FileNotFoundError), a truncated one (JSONDecodeError), a tree without params (TypeError,
    # KeyError), a missing or truncated tensorstore file (tensorstore's ValueError)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise RunError(unreadable_checkpoint(path, e)) from None
    finally:
        handler.close()
    return restored["params"]


def unreadable_checkpoint(path: str, error: BaseException) -> str:
    """The message for a checkpoint (item folder checkpoints/N/state) that cannot be read, naming its step folder
    and what to do: read an earlier step, or move this one away so that the earlier one is the latest."""
    step_dir = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(step_dir)
    earlier = [s for s in run_steps(os.path.dirname(root)) if str(s) != os.path.basename(step_dir)]
    remedy = (f"read another step (export --step {earlier[-1]}; saved: {', '.join(map(str, earlier))}), or move "
              f"{step_dir} out of {root} so that step {earlier[-1]} is the latest" if earlier
              else "the run has no other checkpoint to read")
    return f"{step_dir}: unreadable checkpoint ({short_reason(error)}); {remedy}"
