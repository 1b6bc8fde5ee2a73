"""A train.py run folder as a model: trainable params from its orbax checkpoint + frozen ones from its start.

Train checkpoints hold only the trainable parameters and the optimizer state; the frozen weights are those the
run started from. So train.py records, once, what is needed to put the whole model back together
(RUN_INFO = run_model.json: the resolved model config, the init checkpoint's absolute path or the random-init
seed, sd_locked, the tokenizer, and a fingerprint of the frozen weights it trained with), and `load_run`
merges the two, refusing an init checkpoint that changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnc_jax.checkpoint.store import load_weights
from cnc_jax.model_config import CnCConfig, ConfigError, load_config
from cnc_jax.io import write_atomic
from cnc_jax.models.build import abstract_params, init_params
from cnc_jax.training.state import is_trainable, merge_params, split_params
from flax.traverse_util import flatten_dict

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


def starting_params(model_spec, init_checkpoint: str, random_init: bool, seed: int,
                    skip_parts=()) -> tuple[CnCConfig, dict, list[str]]:
    """(model config, {part: numpy params}, parts initialised fresh) a run starts from: its init checkpoint
    (a converted folder or another run folder), fresh weights (seed) for the parts it lacks; `skip_parts`
    are not initialised."""
    if init_checkpoint:
        ckpt_config, params = load_weights(init_checkpoint)
        model_config = _model_config(model_spec) if model_spec else ckpt_config
        if model_config != ckpt_config:
            what = "the run's model" if isinstance(model_spec, CnCConfig) else f"config.model {model_spec!r}"
            raise ValueError(f"{what} differs from the model in {init_checkpoint}")
    elif random_init:
        model_config = _model_config(model_spec)
        params = {}
    else:
        raise ValueError("set config.init_checkpoint (a converted folder or a run folder) or config.random_init=True")
    missing = [p for p in abstract_params(model_config) if p not in params and p not in skip_parts]
    if missing:
        params.update(init_params(model_config, seed=seed, parts=missing))
    return model_config, params, missing


def _model_config(spec) -> CnCConfig:
    return spec if isinstance(spec, CnCConfig) else load_config(spec)


def record_run(workdir: str, config, model_config: CnCConfig, frozen: dict) -> None:
    """Write RUN_INFO (what export needs) from the train config and the frozen weights the run uses."""
    tokenizer = config.tokenizer
    if tokenizer and tokenizer != "byte_level":
        tokenizer = os.path.abspath(tokenizer)
    info = {"format": RUN_FORMAT, "model": model_config.to_dict(),
            "init_checkpoint": os.path.abspath(config.init_checkpoint) if config.init_checkpoint else "",
            "random_init": bool(config.random_init), "seed": int(config.seed), "sd_locked": bool(config.sd_locked),
            "tokenizer": tokenizer, "frozen_fingerprint": fingerprint(frozen)}
    write_atomic(os.path.join(workdir, RUN_INFO), json.dumps(info, indent=1).encode())


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


def _restore_trainable(path: str) -> dict:
    """The `params` of a saved TrainState as host numpy arrays, whatever mesh the run used; the optimizer state
    (twice the trainable parameters) is never read."""
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    target = {"params": jax.tree_util.tree_map(lambda _: np.zeros((), np.float32), tree["params"])}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                      partial_restore=True))
    return restored["params"]


def load_run(run_dir: str, step: Optional[int] = None) -> tuple[CnCConfig, dict, dict]:
    """(config, {part: numpy params}, info) of a run folder at `step` (default: its latest checkpoint)."""
    info = read_run_info(run_dir)
    steps = run_steps(run_dir)
    if not steps:
        raise RunError(f"{run_dir}: no training checkpoint in {os.path.join(run_dir, 'checkpoints')} "
                       "(the run has not saved a step yet)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"{run_dir}: no checkpoint of step {step} (saved steps: {', '.join(map(str, steps))})")
    source = os.path.join(run_dir, RUN_INFO)
    try:
        config = CnCConfig.from_dict(info["model"], source=source)
    except ConfigError as e:
        raise RunError(str(e)) from None
    init = info.get("init_checkpoint") or ""
    if init and not os.path.exists(init):
        raise RunError(f"{source}: the run's init checkpoint {init} does not exist any more "
                       "(its frozen weights are not in the train checkpoints)")
    sd_locked = bool(info["sd_locked"])
    adapters = [p for p in ("local_fuser", "global_fuser") if is_trainable(config, p, sd_locked=sd_locked)]
    try:
        _, start, _ = starting_params(config, init, not init, int(info.get("seed", 0)), skip_parts=adapters)
    except (ValueError, OSError) as e:
        raise RunError(f"{source}: cannot load the run's init checkpoint {init}: {e}") from None
    _, frozen = split_params(config, {p: t for p, t in start.items() if p not in adapters}, sd_locked)
    if fingerprint(frozen) != info.get("frozen_fingerprint"):
        what = f"init checkpoint {init}" if init else f"random init (seed {info.get('seed')})"
        raise RunError(f"{source}: the frozen weights of the {what} differ from those the run trained with "
                       "(the init checkpoint was replaced or changed)")
    trainable = _restore_trainable(os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "state"))
    params = merge_params(trainable, frozen)
    return config, params, {"run": os.path.abspath(run_dir), "step": step, "tokenizer": info.get("tokenizer", "")}
