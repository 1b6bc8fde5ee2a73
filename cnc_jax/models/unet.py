"""The SD-1.5 UNet with optional local-fuser residuals and an optional soft-guidance mask.

One UNet serves all modes: `control` (13 residuals) is given in modes local/cnc, `mask` (with 4+4
global tokens in the context) in modes global/cnc. The encoder half is shared with the local
fuser (`unet_encoder`), which is a trainable copy of it with LocalResBlocks at the inject layers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import UNetConfig
from cnc_jax.models.attention import SpatialTransformer
from cnc_jax.models.layers import Conv, Dense, GroupNorm, timestep_embedding

Dtype = Any


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features (width model_channels) -> MLP to 4 * model_channels."""

    model_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps):
        t = timestep_embedding(timesteps, self.model_channels).astype(self.dtype)
        t = Dense(4 * self.model_channels, dtype=self.dtype, name="linear_1")(t)
        return Dense(4 * self.model_channels, dtype=self.dtype, name="linear_2")(nn.silu(t))


class FDN(nn.Module):
    """Feature-denormalisation of the local fuser: GroupNorm (no affine) * (1 + gamma(f)) + beta(f)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, features):
        if features.shape[1:3] != x.shape[1:3]:
            raise ValueError(f"depth features {features.shape[1:3]} do not match the block's map {x.shape[1:3]}: "
                             "the image must be 8x the latent")
        c = x.shape[-1]
        normalized = GroupNorm(32, 1e-5, affine=False, dtype=self.dtype)(x)
        gamma = Conv(c, 3, dtype=self.dtype, name="conv_gamma")(features)
        beta = Conv(c, 3, dtype=self.dtype, name="conv_beta")(features)
        return normalized * (1 + gamma) + beta


class ResBlock(nn.Module):
    """openaimodel ResBlock; with `features` it is the local fuser's LocalResBlock (FDN norms)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, features: Optional[jax.Array] = None):
        def norm(name):
            if features is None:
                gn = GroupNorm(32, 1e-5, dtype=self.dtype, name=name)
                return lambda h: gn(h)
            fdn = FDN(dtype=self.dtype, name=name)
            return lambda h: fdn(h, features)

        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv_in")(nn.silu(norm("norm_in")(x)))
        h = h + Dense(self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[:, None, None, :]
        h = Conv(self.out_channels, 3, zero_init=True, dtype=self.dtype, name="conv_out")(
            nn.silu(norm("norm_out")(h)))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="skip")(x)
        return x + h


def _maybe_remat(cls, remat: bool):
    """Blocks are rematerialised (recomputed in the backward pass) when `remat`: activation memory vs FLOPs."""
    return nn.remat(cls) if remat else cls


def _res(out_channels, dtype, remat, name) -> ResBlock:
    return _maybe_remat(ResBlock, remat)(out_channels, dtype=dtype, name=name)


def _attention(cfg: UNetConfig, channels: int, dtype, num_global_tokens: int, name: str,
               remat: bool = False, attention: str = "xla") -> SpatialTransformer:
    heads, dim_head = cfg.heads_for(channels)
    return _maybe_remat(SpatialTransformer, remat)(heads, dim_head, cfg.transformer_depth,
                                                   cfg.use_linear_in_transformer, num_global_tokens, dtype=dtype,
                                                   attention=attention, name=name)


def unet_encoder(cfg: UNetConfig, x, emb, context, mask=None, *, features: Sequence[jax.Array] = (),
                 inject_layers: Sequence[int] = (), num_global_tokens: int = 4, dtype=jnp.float32,
                 remat: bool = False, attention: str = "xla"):
    """Input blocks + middle block; called inside the compact method of the UNet or the local fuser.

    Returns the 12 input-block outputs (the skips) and the middle-block output. Input block i uses
    a LocalResBlock fed by depth features[level] when i is in `inject_layers`.
    """
    skips = []
    h = x
    for i, block in enumerate(cfg.encoder_plan()):
        if block["kind"] == "conv":
            h = Conv(block["cout"], 3, dtype=dtype, name="conv_in")(h)
        elif block["kind"] == "down":
            h = Conv(block["cout"], 3, stride=2, dtype=dtype, name=f"input_{i}_down")(h)
        else:
            f = features[list(inject_layers).index(i)] if i in inject_layers else None
            h = _res(block["cout"], dtype, remat, f"input_{i}_res")(h, emb, f)
            if block["attn"]:
                h = _attention(cfg, block["cout"], dtype, num_global_tokens, f"input_{i}_attn", remat, attention)(
                    h, context, mask)
        skips.append(h)
    ch = cfg.level_channels[-1]
    h = _res(ch, dtype, remat, "middle_res_1")(h, emb)
    h = _attention(cfg, ch, dtype, num_global_tokens, "middle_attn", remat, attention)(h, context, mask)
    h = _res(ch, dtype, remat, "middle_res_2")(h, emb)
    return skips, h


class UNet(nn.Module):
    """eps-prediction UNet. x (B, h, w, 4) latents, t (B,) int, context (B, M, context_dim).

    control: 13 residuals (input blocks 0..11, middle) added to the skips and the middle output.
    mask: (B, H, W, 1) foreground at image resolution; needs the 2k global tokens at the end of context.
    The encoder half runs under stop_gradient, as the official CnC UNets run it under no_grad: the
    adapters learn only through the decoder half.
    """

    config: UNetConfig
    num_global_tokens: int = 4
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "xla"  # self-attention implementation (cnc_jax.models.attention_kernels)

    @nn.compact
    def __call__(self, x, timesteps, context, control: Optional[Sequence[jax.Array]] = None,
                 mask: Optional[jax.Array] = None):
        cfg = self.config
        emb = TimeEmbedding(cfg.model_channels, dtype=self.dtype, name="time_embed")(timesteps)
        # the frozen encoder needs no backward pass, so it is never rematerialised
        skips, h = unet_encoder(cfg, x.astype(self.dtype), emb, context, mask,
                                num_global_tokens=self.num_global_tokens, dtype=self.dtype, attention=self.attention)
        emb, skips, h = jax.lax.stop_gradient((emb, skips, h))
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control must hold {len(skips) + 1} residuals, got {len(control)}")
            h = h + control[-1]
            skips = [s + c for s, c in zip(skips, control[:-1])]
        for i, block in enumerate(cfg.decoder_plan()):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _res(block["cout"], self.dtype, self.remat, f"output_{i}_res")(h, emb)
            if block["attn"]:
                h = _attention(cfg, block["cout"], self.dtype, self.num_global_tokens, f"output_{i}_attn",
                               self.remat, self.attention)(h, context, mask)
            if block["up"]:
                h = Conv(block["cout"], 3, upsample_input=True, dtype=self.dtype, name=f"output_{i}_up")(h)
        h = nn.silu(GroupNorm(32, 1e-5, dtype=self.dtype, name="norm_out")(h))
        return Conv(cfg.out_channels, 3, zero_init=True, dtype=self.dtype, name="conv_out")(h)
