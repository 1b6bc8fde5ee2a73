"""The official DDIM schedule and update (run by samplers.sample_loop as one lax.scan), and batched guidance.

Official facts reproduced (ldm's make_ddim_timesteps / make_ddim_sampling_parameters / p_sample_ddim):
uniform timesteps range(0, T, T // S) + 1; alpha_prev[0] = alphas_cumprod[0] (not 1); per-step scalars
in float32; pred_x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t); x_prev = sqrt(a_prev) pred_x0 +
sqrt(1 - a_prev - sigma^2) e + sigma * noise.

Randomness is per image: image i of a batch draws its x_T and its step noise from its own key, so
an image depends only on (seed, its index in its job), never on what else is in the batch. The loop that
runs this step (and the other samplers') is cnc_jax.sampling.samplers.sample_loop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.diffusion import Schedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t (B, h, w, c), t (B,) int32) -> eps


@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM constants (numpy float32, ascending timesteps; sampling walks them backwards)."""

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_prev: np.ndarray
    sigmas: np.ndarray
    sqrt_one_minus_alphas: np.ndarray

    @classmethod
    def make(cls, schedule: Schedule, num_steps: int, eta: float = 0.0) -> "DDIMSchedule":
        total = schedule.num_timesteps
        if not 1 <= num_steps <= total:
            raise ValueError(f"steps must be in 1..{total}, got {num_steps}")
        # range(0, T, T // S) + 1: like the official sampler, S that do not divide T give S + 1 steps
        timesteps = np.arange(0, total, total // num_steps) + 1
        if timesteps[-1] >= total:
            raise ValueError(f"steps={num_steps}: the official uniform DDIM grid would need timestep {timesteps[-1]} "
                             f"of {total}; choose another step count (e.g. {num_steps - 1} or {num_steps + 1})")
        ac = schedule.alphas_cumprod  # float32, as the official model buffer
        alphas = ac[timesteps]
        alphas_prev = np.asarray([ac[0]] + ac[timesteps[:-1]].tolist(), np.float64)
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return cls(timesteps=timesteps.astype(np.int32), alphas=alphas.astype(np.float32),
                   alphas_prev=alphas_prev.astype(np.float32), sigmas=sigmas.astype(np.float32),
                   sqrt_one_minus_alphas=np.sqrt(1.0 - alphas).astype(np.float32))

    def arrays(self) -> dict:
        """The per-step scan inputs in sampling order (last timestep first)."""
        return {name: jnp.asarray(getattr(self, name)[::-1].copy())
                for name in ("timesteps", "alphas", "alphas_prev", "sigmas", "sqrt_one_minus_alphas")}


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T of each image from its own key: keys (B,) -> (B, *shape)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


def ddim_step(x, e_t, step: dict, noise):
    """One p_sample_ddim update with the step's float32 scalars; returns (x_prev, pred_x0)."""
    a_t, a_prev, sigma = step["alphas"], step["alphas_prev"], step["sigmas"]
    pred_x0 = (x - step["sqrt_one_minus_alphas"] * e_t) / jnp.sqrt(a_t)
    dir_xt = jnp.sqrt(1.0 - a_prev - jnp.square(sigma)) * e_t
    return jnp.sqrt(a_prev) * pred_x0 + dir_xt + sigma * noise, pred_x0


def classifier_free_guidance(eps_both: Callable[[jax.Array, jax.Array], jax.Array], scale) -> EpsFn:
    """eps = eps_u + scale (eps_c - eps_u) from ONE batched call on [x, x] -> [eps_c; eps_u].

    scale: a number, or one per image (B,).
    """

    def eps(x, t):
        out = eps_both(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        cond, uncond = jnp.split(out, 2)
        s = jnp.asarray(scale, cond.dtype)
        s = s.reshape(s.shape + (1,) * (cond.ndim - s.ndim)) if s.ndim else s
        return uncond + s * (cond - uncond)

    return eps
