"""Background inpainting for `prepare background`: the SD-inpainting model (our UNet with 9 input channels)
driven like diffusers' StableDiffusionInpaintPipeline, which the official data/get_background.py calls.

Per image (uint8 RGB, mask {0, 255} already dilated):
  x = u/255*2 - 1; m = (mask/255 >= 0.5); masked image = x * (1 - m)       (diffusers' preprocessing)
  mask latent = m at latent size with torch 'nearest' (pixel 8i, 8j); masked-image latent = a sample of the
  VAE posterior of the masked image x 0.18215
  UNet input = concat[latent (4) | mask (1) | masked-image latent (4)]; text = prompt / negative prompt
  strength 1: start from pure noise; classifier-free guidance eps_u + g (eps_c - eps_u); decode;
  (x/2 + 0.5) clipped, x 255 rounded.
Sampler: the official pipeline runs the checkpoint's default scheduler, PNDM (PLMS, skip_prk_steps) for
runwayml/stable-diffusion-inpainting; so do we by default (`pndm`, diffusers-exact), any sampler of
cnc_jax.sampling.samplers may be chosen. The whole sampler is one
compiled program per (batch, size), split over all devices; image noise comes from the uid's own key, so a
background does not depend on its batch or the device count.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.checkpoint import load_weights
from cnc_jax.data_parallel import DataParallel
from cnc_jax.model_config import CnCConfig, sd15
from cnc_jax.models.unet import UNet
from cnc_jax.models.vae import AutoencoderKL, DiagonalGaussian
from cnc_jax.sampling.ddim import classifier_free_guidance, initial_noise
from cnc_jax.sampling.sampler_names import DEFAULT_BACKGROUND_SAMPLER
from cnc_jax.sampling.samplers import sample_loop, sampler_arrays
from cnc_jax.text_encoder import TextEncoder

PROMPT = "empty scenery, ultra detailed, no people"
NEGATIVE_PROMPT = "low resolution, worst quality, low quality"
STEPS, GUIDANCE = 25, 10.0


def inpainting_config(base: CnCConfig | None = None) -> CnCConfig:
    """SD 1.5 with the 9-channel inpainting UNet (mode 'sd'), for converting sd-v1-5-inpainting.ckpt."""
    base = base or sd15()
    return dataclasses.replace(base, unet=dataclasses.replace(base.unet, in_channels=9))


class Inpainter:
    """Inpainter(config, params, tokenizer)(images, masks, keys) -> inpainted uint8 images."""

    def __init__(self, config: CnCConfig, params: dict, tokenizer, *, prompt: str = PROMPT,
                 negative_prompt: str = NEGATIVE_PROMPT, steps: int = STEPS, guidance: float = GUIDANCE,
                 sampler: str = DEFAULT_BACKGROUND_SAMPLER, parallel: DataParallel | None = None):
        if config.unet.in_channels != 9:
            raise ValueError(f"an inpainting UNet has 9 input channels, this checkpoint's has {config.unet.in_channels}")
        self.config = config
        self.parallel = parallel or DataParallel()
        contexts = TextEncoder(config.text_encoder, params["text_encoder"], tokenizer)([prompt, negative_prompt])
        self._contexts = self.parallel.replicate(jnp.asarray(contexts))
        self._params = self.parallel.replicate({"unet": params["unet"], "vae": params["vae"]})
        self.sampler = sampler
        self._steps = sampler_arrays(sampler, config.diffusion, steps)
        self._guidance = jnp.float32(guidance)

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer, **kwargs) -> "Inpainter":
        """From a converted SD-inpainting checkpoint folder (convert_torch_weights.py convert --config ...) or a
        diffusers SD-inpainting folder."""
        config, params = load_weights(path)
        return cls(config, params, tokenizer, **kwargs)

    def __call__(self, images: np.ndarray, masks: np.ndarray, keys: np.ndarray, batch_size: int | None = None):
        """images (B, H, W, 3) uint8, masks (B, H, W) uint8 (255 = inpaint), keys (B, 2) uint32 -> (B, H, W, 3)
        uint8. H, W multiples of 8. Batches are padded to `batch_size` (one compiled program per size)."""
        size = self.parallel.padded_size(batch_size or len(images))
        fn = functools.partial(_inpaint, self.config, self.sampler, self._params, self._contexts, self._steps,
                               self._guidance)
        return self.parallel.map(fn, images, masks, keys, size=size)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _inpaint(config: CnCConfig, sampler: str, params, contexts, steps, guidance, images, masks, keys):
    vae, unet, scale = AutoencoderKL(config.vae), UNet(config.unet, num_global_tokens=0), config.diffusion.scale_factor
    batch = images.shape[0]
    x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    m = (masks.astype(jnp.float32) / 255.0 >= 0.5).astype(jnp.float32)[..., None]
    moments = vae.apply({"params": params["vae"]}, x * (1.0 - m), method=AutoencoderKL.encode)
    posterior = DiagonalGaussian.from_moments(moments)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), posterior.mean.shape[1:]))(keys)
    f = config.vae.downsample_factor
    extra = jnp.concatenate([m[:, ::f, ::f], (posterior.mean + posterior.std * noise) * scale], axis=-1)
    context = jnp.concatenate([jnp.broadcast_to(contexts[i], (batch,) + contexts.shape[1:]) for i in (0, 1)])

    def eps_both(x2, t2):
        return unet.apply({"params": params["unet"]}, jnp.concatenate([x2, jnp.concatenate([extra, extra])], -1),
                          t2, context)

    x_T = initial_noise(keys, extra.shape[1:3] + (config.unet.out_channels,))
    z = sample_loop(classifier_free_guidance(eps_both, guidance), sampler, x_T, steps, keys)
    decoded = vae.apply({"params": params["vae"]}, z / scale, method=AutoencoderKL.decode)
    return jnp.round(jnp.clip(decoded / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
