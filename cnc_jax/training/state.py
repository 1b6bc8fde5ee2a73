"""What trains and what stays frozen, and the train state (only trainable leaves enter the optimizer).

The official recipe (models/cnc.py configure_optimizers): the mode's adapter(s) train; with
sd_locked=False also the UNet's output blocks and its `out` layers (norm_out, conv_out). Everything else
(UNet input/middle blocks and time embedding, VAE, text encoder) is frozen and never enters the optimizer.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cnc_jax.model_config import CnCConfig


def is_trainable(config: CnCConfig, part: str, block: str = "", sd_locked: bool = True) -> bool:
    """Whether a part (and, for the UNet, one of its top-level blocks) trains in this stage."""
    if part == "local_fuser":
        return config.has_local
    if part == "global_fuser":
        return config.has_global
    if part == "unet" and not sd_locked:
        return block.startswith("output_") or block in ("norm_out", "conv_out")
    return False


def split_params(config: CnCConfig, params: dict, sd_locked: bool) -> tuple[dict, dict]:
    """{part: tree} -> (trainable, frozen): disjoint {part: tree} dicts (the UNet splits by top-level block)."""
    trainable, frozen = {}, {}
    for part, tree in params.items():
        if part == "unet":
            t = {k: v for k, v in tree.items() if is_trainable(config, part, k, sd_locked)}
            f = {k: v for k, v in tree.items() if k not in t}
        else:
            t, f = (tree, {}) if is_trainable(config, part, sd_locked=sd_locked) else ({}, tree)
        if t:
            trainable[part] = t
        if f:
            frozen[part] = f
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of split_params."""
    return {part: {**frozen.get(part, {}), **trainable.get(part, {})} for part in {**frozen, **trainable}}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps done
    params: Any  # trainable params only
    opt_state: Any
    rng: jax.Array  # base key; step s uses fold_in(rng, s)
    nonfinite_step: jax.Array  # int32: first step whose loss/gradient was not finite, -1 if none

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   nonfinite_step=jnp.full((), -1, jnp.int32))


SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(learning_rate: float, *, warmup_steps: int = 0, kind: str = "constant", total_steps: int = 0):
    """Linear warmup from 0 over warmup_steps, then constant, cosine or linear decay to 0 at total_steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"config.lr_schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind != "constant" and total_steps <= warmup_steps:
        raise ValueError(f"config.lr_schedule={kind!r} decays over the steps after warmup: the run's "
                         f"{total_steps} steps leave none after warmup_steps={warmup_steps}")
    decay_steps = total_steps - warmup_steps
    after = {"constant": lambda: optax.constant_schedule(learning_rate),
             "cosine": lambda: optax.cosine_decay_schedule(learning_rate, decay_steps),
             "linear": lambda: optax.linear_schedule(learning_rate, 0.0, decay_steps)}[kind]()
    if not warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, warmup_steps: int = 0, schedule: str = "constant",
                   total_steps: int = 0, grad_clip_norm: float = 0.0) -> tuple[optax.GradientTransformation, Any]:
    """torch.optim.AdamW with its defaults (decoupled weight decay 0.01), an lr schedule (make_schedule) and, with
    grad_clip_norm > 0, the gradients clipped to that global norm first (torch's clip_grad_norm_)."""
    lr = make_schedule(learning_rate, warmup_steps=warmup_steps, kind=schedule, total_steps=total_steps)
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip_norm < 0:
        raise ValueError(f"config.grad_clip_norm must be >= 0 (0 = off), got {grad_clip_norm}")
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx, lr
