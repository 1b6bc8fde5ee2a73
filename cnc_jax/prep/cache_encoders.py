"""The encoders of a cached TFDS build (cnc_jax.data.tfds, config "cached"): VAE posterior moments of the training
images and CLIP text embeddings of the captions, data-parallel over the local devices, so training can skip both
frozen encoders."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from cnc_jax.checkpoint import load_converted
from cnc_jax.data.records import image_to_signed
from cnc_jax.data_parallel import DataParallel
from cnc_jax.models.vae import AutoencoderKL
from cnc_jax.text_encoder import TextEncoder


class CacheEncoders:
    """VAE moments of training images and text embeddings of captions, for cached builds (data parallel)."""

    def __init__(self, config, vae_params, text_params, tokenizer, batch_size: int = 8):
        self.parallel = DataParallel()
        self.text = TextEncoder(config.text_encoder, text_params, tokenizer)
        self.batch_size = self.parallel.padded_size(batch_size)
        vae = AutoencoderKL(config.vae)
        params = self.parallel.replicate(vae_params)
        encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
        self._moments = lambda x: encode(params, x)

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer, batch_size: int = 8) -> "CacheEncoders":
        """From a converted SD / CnC checkpoint folder (its VAE and text encoder)."""
        config, params = load_converted(path, ("vae", "text_encoder"))
        return cls(config, params["vae"], params["text_encoder"], tokenizer, batch_size)

    def moments(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, R, R, 3) -> (B, R/8, R/8, 2z) float32."""
        return self.parallel.map(self._moments, image_to_signed(images), size=self.batch_size)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        return np.asarray(self.text(list(captions)), np.float32)
