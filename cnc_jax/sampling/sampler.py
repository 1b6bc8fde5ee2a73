"""CnC sampling: conditions -> guided eps function -> the compiled DDIM loop -> latents.

Both guidance branches run as ONE batched model call ([cond; uncond] along the batch); the
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

from cnc_jax.config import CnCConfig
from cnc_jax.models.cnc import CnC
from cnc_jax.sampling.ddim import classifier_free_guidance, ddim_sample, initial_noise


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


def cnc_eps_fn(model: CnC, params: dict, cond: Conditions, guidance_scale, use_guidance: bool):
    """(x_t, t) -> eps for a batch, with classifier-free guidance as one batched call when on."""
    strength = cond.global_strength if cond.global_strength is not None else jnp.ones((cond.text_context.shape[0], 2))

    def apply(x, t, context, c: Conditions, gs):
        return model.apply({"params": params}, x, t, context, fg_depth=c.fg_depth, bg_depth=c.bg_depth,
                           fg_emb=c.fg_emb, bg_emb=c.bg_emb, mask=c.mask, global_strength=gs).astype(x.dtype)

    if not use_guidance:
        return lambda x, t: apply(x, t, cond.text_context, cond, strength)
    both = jax.tree_util.tree_map(_twice, cond)
    context = jnp.concatenate([cond.text_context, cond.uncond_context])
    return classifier_free_guidance(lambda x, t: apply(x, t, context, both, _twice(strength)), guidance_scale)


@functools.partial(jax.jit, static_argnames=("config", "use_guidance", "latent_shape", "return_intermediates",
                                             "dtype", "attention"))
def sample_latents(config: CnCConfig, params: dict, cond: Conditions, keys: jax.Array, steps: dict, guidance_scale,
                   *, use_guidance: bool, latent_shape: tuple[int, int, int], return_intermediates: bool = False,
                   x_T: Optional[jax.Array] = None, dtype: str = "float32", attention: str = "xla"):
    """The whole sampler as one program: x_T from per-image keys (unless given), then the DDIM scan.

    params: the diffusion parts {'unet', 'local_fuser', 'global_fuser'} of `config`; dtype: compute dtype
    ('float32' | 'bfloat16'; parameters stay as given); attention: the self-attention implementation.
    Retraces only for a new config, batch or latent shape, step count, or guidance on/off — never
    for a new prompt, seed, guidance scale, eta or strength (they are data).
    """
    if x_T is None:
        x_T = initial_noise(keys, latent_shape)
    model = CnC(config, dtype=jnp.dtype(dtype), attention=attention)
    eps_fn = cnc_eps_fn(model, params, cond, guidance_scale, use_guidance)
    return ddim_sample(eps_fn, x_T, steps, keys, return_intermediates)
