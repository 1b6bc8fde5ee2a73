"""The training image log of the official code (CnC.log_images): reconstruction, depth maps, mask and
guided samples (scale 9, DDIM by default; any sampler) of the first images of a batch, as one PNG grid."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.model_config import CnCConfig, TextEncoderConfig, VAEConfig
from cnc_jax.io import to_uint8
from cnc_jax.models.build import DIFFUSION_PARTS
from cnc_jax.models.clip_text import CLIPTextTransformer
from cnc_jax.models.vae import AutoencoderKL, DiagonalGaussian
from cnc_jax.sampling.guided import Conditions, sample_latents
from cnc_jax.sampling.sampler_names import DEFAULT_SAMPLER
from cnc_jax.sampling.samplers import sampler_arrays
from cnc_jax.training.step import diffusion_conditions


def _rgb(x: np.ndarray, lo: float) -> np.ndarray:
    """[-1, 1] (lo=-1) or [0, 1] (lo=0) images (N, H, W, C) -> one uint8 row (H, N*W, 3)."""
    x = np.asarray(x, np.float32)
    x = (x + 1) / 2 if lo < 0 else x
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, -1)
    return np.concatenate(list(to_uint8(x)), axis=1)


@functools.lru_cache(maxsize=None)
def _frozen_fns(vae_config: VAEConfig, text_config: TextEncoderConfig, scale: float):
    """Jitted (encode to scaled latent mode, decode scaled latents, text context), built once per config."""
    vae, text = AutoencoderKL(vae_config), CLIPTextTransformer(text_config)
    encode = jax.jit(lambda p, x: scale * vae.apply({"params": p}, x, method=AutoencoderKL.posterior).mode())
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / scale, method=AutoencoderKL.decode))
    context = jax.jit(lambda p, ids: text.apply({"params": p}, ids))
    return encode, decode, context


def log_images(config: CnCConfig, params: dict, batch: dict, empty_input_ids: np.ndarray, *, num: int = 4,
               steps: int = 50, guidance: float = 9.0, seed: int = 0, attention: str = "xla",
               sampler: str = DEFAULT_SAMPLER) -> np.ndarray:
    """params: all parts {'unet', adapters, 'vae', 'text_encoder'} (device or host arrays); batch: host numpy."""
    batch = {k: np.asarray(v)[:num] for k, v in batch.items() if k != "uid"}
    n = len(batch["image"] if "image" in batch else batch["latent_moments"])
    scale = config.diffusion.scale_factor
    encode, decode, text_context = _frozen_fns(config.vae, config.text_encoder, scale)
    if "latent_moments" in batch:
        z = scale * DiagonalGaussian.from_moments(jnp.asarray(batch["latent_moments"])).mode()
    else:
        z = encode(params["vae"], batch["image"])
    if "text_embedding" in batch:
        context = batch["text_embedding"]
    else:
        context = text_context(params["text_encoder"], batch["input_ids"])
    uncond = text_context(params["text_encoder"], np.repeat(empty_input_ids[None], n, 0))
    cond = diffusion_conditions(config, batch)
    strength = np.ones((n, 2), np.float32) if config.has_global else None
    arrays = sampler_arrays(sampler, config.diffusion, steps)
    diffusion = {k: params[k] for k in DIFFUSION_PARTS if k in params}
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(n)])
    samples = sample_latents(config, diffusion, Conditions(text_context=context, uncond_context=uncond,
                                                          global_strength=strength, **cond),
                             keys, arrays, guidance, use_guidance=True, latent_shape=z.shape[1:], attention=attention,
                             sampler=sampler)
    rows = [_rgb(decode(params["vae"], z), -1)]
    rows += [_rgb(batch[k], 0) for k in ("fg_depth", "bg_depth", "mask") if k in cond]
    rows.append(_rgb(decode(params["vae"], samples), -1))
    return np.concatenate(rows, axis=0)
