"""The DDPM schedule of LatentDiffusion, q_sample and the training loss (LDM simple eps-MSE).

Schedules are computed in float64 with numpy, then rounded to float32, as the official code
builds its buffers; computing the cumulative product in float32 gives visibly different values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.model_config import DiffusionConfig


def linear_betas(cfg: DiffusionConfig) -> np.ndarray:
    """LDM's 'linear' schedule (the scaled-linear of SD): linspace of square roots, squared (float64)."""
    return np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=np.float64) ** 2


@dataclasses.dataclass(frozen=True)
class Schedule:
    """float32 schedule buffers (numpy; they become constants inside jitted code)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    lvlb_weights: np.ndarray
    alphas_cumprod_f64: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        betas = linear_betas(cfg)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        f32 = lambda a: np.asarray(a, np.float32)
        # The official code derives lvlb_weights from its float32 buffers, in float32.
        with np.errstate(divide="ignore"):  # posterior_variance[0] == 0; entry 0 is replaced below
            lvlb = f32(betas) ** 2 / (2 * f32(posterior_variance) * f32(alphas) * (1 - f32(ac)))
        lvlb[0] = lvlb[1]
        return cls(betas=f32(betas), alphas_cumprod=f32(ac), alphas_cumprod_prev=f32(ac_prev),
                   sqrt_alphas_cumprod=f32(np.sqrt(ac)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
                   lvlb_weights=lvlb, alphas_cumprod_f64=ac)


def _per_sample(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    return jnp.asarray(values)[t].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
    return (_per_sample(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _per_sample(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)


def eps_loss(model_output: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-sample L2 loss (mean over all non-batch axes); the training loss is its batch mean."""
    err = jnp.square(model_output.astype(jnp.float32) - noise.astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def loss_terms(schedule: Schedule, model_output: jax.Array, noise: jax.Array, t: jax.Array) -> dict:
    """The official p_losses numbers: loss (= loss_simple, logvar 0), and the logged, unweighted loss_vlb."""
    per_sample = eps_loss(model_output, noise)
    loss_simple = jnp.mean(per_sample)
    loss_vlb = jnp.mean(jnp.asarray(schedule.lvlb_weights)[t] * per_sample)
    return {"loss": loss_simple, "loss_simple": loss_simple, "loss_vlb": loss_vlb, "loss_per_sample": per_sample}
