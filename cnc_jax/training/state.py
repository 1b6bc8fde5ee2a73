"""The train state (only trainable leaves enter the optimizer; which those are: cnc_jax.models.parts) and the
optimizer: AdamW with the torch defaults, an lr schedule and optional gradient clipping.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


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
