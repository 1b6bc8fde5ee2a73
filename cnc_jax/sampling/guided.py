"""CnC sampling: conditions -> guided eps function -> the compiled sampler loop -> latents.

What reads neither x_t nor t (the context with the global tokens, the local fuser's depth features) is computed
once before the loop (CnC.conditions); each step runs only CnC.denoise. Both guidance branches run as ONE batched model call ([cond; uncond] along the batch); the
unconditional branch keeps the same depth maps, embeddings and mask and only swaps the text (the
negative prompt). `global_strength` is applied in both branches and also when guidance is off (the
official sampler silently drops it at guidance scale 1).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from cnc_jax.model_config import CnCConfig
from cnc_jax.models.cnc import CnC
from cnc_jax.sampling.ddim import classifier_free_guidance, initial_noise
from cnc_jax.sampling.samplers import sample_loop


@flax.struct.dataclass
class Conditions:
    """Everything one batch of images is conditioned on (arrays; absent conditions are None).

    text_context / uncond_context: (B, L, C) text encoder outputs of the prompt / negative prompt.
    fg_depth, bg_depth: (B, H, W, 3) in [0, 1]; fg_emb, bg_emb: (B, C); mask: (B, H, W, 1);
    global_strength: (B, 2) per image [fg, bg].
    """

    text_context: jax.Array
    uncond_context: Optional[jax.Array] = None
    fg_depth: Optional[jax.Array] = None
    bg_depth: Optional[jax.Array] = None
    fg_emb: Optional[jax.Array] = None
    bg_emb: Optional[jax.Array] = None
    mask: Optional[jax.Array] = None
    global_strength: Optional[jax.Array] = None


def _twice(x):
    return None if x is None else jnp.concatenate([x, x])


def batch_conditions(model: CnC, params: dict, cond: Conditions, use_guidance: bool) -> dict:
    """CnC.conditions of the model batch ([cond; uncond] when guided): computed once, before the loop."""
    strength = cond.global_strength if cond.global_strength is not None else jnp.ones((cond.text_context.shape[0], 2))
    context = cond.text_context
    if use_guidance:  # the same depth maps, embeddings and mask; the negative prompt's text
        context = jnp.concatenate([cond.text_context, cond.uncond_context])
        cond, strength = jax.tree_util.tree_map(_twice, cond), _twice(strength)
    return model.apply({"params": params}, context, fg_depth=cond.fg_depth, bg_depth=cond.bg_depth,
                       fg_emb=cond.fg_emb, bg_emb=cond.bg_emb, mask=cond.mask, global_strength=strength,
                       method=CnC.conditions)


def denoise_fn(model: CnC, params: dict, prepared: dict, guidance_scale, use_guidance: bool):
    """(x_t, t) -> eps from batch_conditions' output: the per-step work, guidance as one batched call."""

    def eps(x, t):
        return model.apply({"params": params}, x, t, prepared, method=CnC.denoise).astype(x.dtype)

    return classifier_free_guidance(eps, guidance_scale) if use_guidance else eps


def cnc_eps_fn(model: CnC, params: dict, cond: Conditions, guidance_scale, use_guidance: bool):
    """(x_t, t) -> eps for a batch; the step-invariant conditions are computed here, outside the caller's loop."""
    return denoise_fn(model, params, batch_conditions(model, params, cond, use_guidance), guidance_scale,
                      use_guidance)


@functools.partial(jax.jit, static_argnames=("config", "use_guidance", "latent_shape", "return_intermediates",
                                             "dtype", "attention", "sampler"))
def sample_latents(config: CnCConfig, params: dict, cond: Conditions, keys: jax.Array, steps: dict, guidance_scale,
                   *, use_guidance: bool, latent_shape: tuple[int, int, int], return_intermediates: bool = False,
                   x_T: Optional[jax.Array] = None, dtype: str = "float32", attention: str = "xla",
                   sampler: str = "ddim"):
    """The whole sampler as one program: x_T from per-image keys (unless given), the hoisted conditions, then
    the scan of `sampler` over `steps` (samplers.sampler_arrays(sampler, ...); DDIMSchedule.arrays() for ddim).

    params: the diffusion parts {'unet', 'local_fuser', 'global_fuser'} of `config`; dtype: compute dtype
    ('float32' | 'bfloat16'; parameters stay as given); attention: the self-attention implementation.
    Retraces only for a new config, batch or latent shape, sampler, step count, or guidance on/off — never
    for a new prompt, seed, guidance scale, eta or strength (they are data).
    """
    if x_T is None:
        x_T = initial_noise(keys, latent_shape)
    model = CnC(config, dtype=jnp.dtype(dtype), attention=attention)
    eps_fn = cnc_eps_fn(model, params, cond, guidance_scale, use_guidance)
    return sample_loop(eps_fn, sampler, x_T, steps, keys, return_intermediates=return_intermediates)
