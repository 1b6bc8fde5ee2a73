"""The one loader of whole models: a converted folder, a diffusers folder or a train.py run folder -> (config, params).

A run folder's checkpoints hold only the trainable parameters; its frozen ones are those of the init checkpoint it
started from, which is itself any of the three. So `load_weights` -> `load_run` -> `starting_params` ->
`load_weights` of the init checkpoint is one explicit recursion, here in one module.
"""

from __future__ import annotations

import os
from typing import Optional

from cnc_jax.checkpoint.diffusers import is_diffusers_folder, load_diffusers
from cnc_jax.checkpoint.run_folder import (RUN_INFO, RunError, fingerprint, is_run_folder, read_run_info,
                                           restore_trainable, run_steps)
from cnc_jax.checkpoint.store import StoreError, load_converted
from cnc_jax.model_config import CnCConfig, ConfigError, load_config
from cnc_jax.models.build import abstract_params, init_params
from cnc_jax.models.parts import is_trainable, merge_params, split_params


def load_weights(path: str, step: Optional[int] = None) -> tuple[CnCConfig, dict]:
    """(config, {part: numpy params}) of a converted folder, a train.py run folder (its latest checkpoint, or
    `step`) or a diffusers SD folder: the one loader of sample.py, train.py's init_checkpoint, prepare background,
    the demo and evaluation."""
    if is_run_folder(path):
        try:
            config, params, _ = load_run(path, step)
        except RunError as e:
            raise StoreError(str(e)) from None
        return config, params
    if step is not None:
        raise StoreError(f"{path}: --step needs a train.py run folder; this is not one")
    if is_diffusers_folder(path):
        return load_diffusers(path)
    return load_converted(path)


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
    trainable = restore_trainable(os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "state"))
    params = merge_params(trainable, frozen)
    return config, params, {"run": os.path.abspath(run_dir), "step": step, "tokenizer": info.get("tokenizer", "")}
