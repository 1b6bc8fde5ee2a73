"""The local fuser: fg/bg depth maps -> 13 residuals for the UNet (ControlNet-style, with FDN)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import LocalFuserConfig
from cnc_jax.models.layers import Conv
from cnc_jax.models.unet import TimeEmbedding, unet_encoder

Dtype = Any


class FeatureExtractor(nn.Module):
    """Separate fg / bg conv stems (each /4), concatenated, then 4 stride-2 stages with zero convs.

    Returns features at 1/8, 1/16, 1/32, 1/64 of the image side: one per UNet level.
    """

    inject_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fg_depth, bg_depth):
        def stem(x, branch):
            for i, (features, stride) in enumerate(((32, 1), (64, 2), (64, 1), (64, 2))):
                x = nn.silu(Conv(features, 3, stride=stride, dtype=self.dtype, name=f"{branch}_conv_{i}")(x))
            return x

        h = jnp.concatenate([stem(fg_depth.astype(self.dtype), "fg"), stem(bg_depth.astype(self.dtype), "bg")], -1)
        outputs = []
        for i, ch in enumerate(self.inject_channels):
            h = nn.silu(Conv(ch, 3, stride=2, dtype=self.dtype, name=f"down_{i}")(h))
            outputs.append(Conv(ch, 3, zero_init=True, dtype=self.dtype, name=f"zero_conv_{i}")(h))
        return outputs


class LocalFuser(nn.Module):
    """x (B,h,w,4), t, context, fg/bg depth (B,8h,8w,3) in [0,1], optional mask -> 13 residuals.

    In mode cnc the fuser's cross-attentions see the same 85-token context and soft-guidance mask
    as the UNet; in mode local the context is text only and there is no mask.
    """

    config: LocalFuserConfig
    num_global_tokens: int = 4
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, timesteps, context, fg_depth=None, bg_depth=None, mask: Optional[jax.Array] = None,
                 return_features: bool = False, features: Optional[Sequence[jax.Array]] = None,
                 features_only: bool = False):
        """features: the depth features if already computed (they read neither x nor t, so a sampler computes
        them once: call with features_only=True and x = timesteps = context = None)."""
        cfg = self.config
        if features is None:
            if not features_only and fg_depth.shape[1:3] != (8 * x.shape[1], 8 * x.shape[2]):
                raise ValueError(f"depth maps {fg_depth.shape[1:3]} must be 8x the latent {x.shape[1:3]}")
            features = FeatureExtractor(cfg.inject_channels, dtype=self.dtype, name="feature_extractor")(
                fg_depth, bg_depth)
        if features_only:
            return features
        emb = TimeEmbedding(cfg.model_channels, dtype=self.dtype, name="time_embed")(timesteps)
        skips, h = unet_encoder(cfg, x.astype(self.dtype), emb, context, mask, features=features,
                                inject_layers=cfg.inject_layers, num_global_tokens=self.num_global_tokens,
                                dtype=self.dtype, remat=self.remat, attention=self.attention)
        controls = [Conv(s.shape[-1], 1, padding=0, zero_init=True, dtype=self.dtype, name=f"zero_conv_{i}")(s)
                    for i, s in enumerate(skips)]
        controls.append(Conv(h.shape[-1], 1, padding=0, zero_init=True, dtype=self.dtype,
                             name="middle_zero_conv")(h))
        return (controls, features) if return_features else controls
