"""The train state (only trainable leaves enter the optimizer; which those are: cnc_jax.models.parts) and the
optimizer: AdamW with the torch defaults, an lr schedule and optional gradient clipping.

The optimizer is optax.adamw's chain with every stage named (optax.named_chain), so its state is a dict of the
stages' states and a checkpoint names them (opt_state/scale_by_adam/mu/..., not opt_state/0/mu/...). Checkpoints
written before the names keep optax.adamw's tuple; `named_opt_state` / `unnamed_opt_state` convert between them.
"""

from __future__ import annotations

import collections
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
# the optimizer's stages in order (clip_by_global_norm only with config.grad_clip_norm > 0): optax's names
OPTIMIZER_STAGES = ("clip_by_global_norm", "scale_by_adam", "add_decayed_weights", "scale_by_learning_rate")


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
    if grad_clip_norm < 0:
        raise ValueError(f"config.grad_clip_norm must be >= 0 (0 = off), got {grad_clip_norm}")
    stages = {"clip_by_global_norm": optax.clip_by_global_norm(grad_clip_norm),  # optax.adamw's chain, named
              "scale_by_adam": optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              "add_decayed_weights": optax.add_decayed_weights(weight_decay),
              "scale_by_learning_rate": optax.scale_by_learning_rate(lr)}
    return optax.named_chain(*[(name, stages[name]) for name in OPTIMIZER_STAGES
                               if grad_clip_norm or name != "clip_by_global_norm"]), lr


def named_opt_state(unnamed: Any) -> dict:
    """The named state of an optimizer state in optax.adamw's tuple layout (checkpoints written before the names:
    (adam, decay, lr), or (clip, (adam, decay, lr)) with clipping)."""
    stages = list(unnamed)
    if len(stages) == 2:
        stages = [stages[0], *stages[1]]
    names = OPTIMIZER_STAGES[len(OPTIMIZER_STAGES) - len(stages):]
    return collections.OrderedDict(zip(names, stages))


def unnamed_opt_state(named: dict) -> tuple:
    """optax.adamw's tuple layout of a named optimizer state (the target to restore an old checkpoint into)."""
    adamw = tuple(named[name] for name in OPTIMIZER_STAGES[1:])
    return (named["clip_by_global_norm"], adamw) if "clip_by_global_norm" in named else adamw
