"""LDM `AutoencoderKL` (the SD first stage): Encoder, Decoder and the diagonal-Gaussian posterior, NHWC.

Module names follow `cnc_jax.checkpoint.names` (e.g. official `encoder.down.1.block.0` is our
`encoder/down_1_block_0`). As in the official code, where attention blocks go is decided by the
configured `resolution`, not by the size of the input, so any image size whose sides divide by
the downsample factor runs with the same parameters.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cnc_jax.model_config import VAEConfig
from cnc_jax.models.attention_kernels import chunked_attention, xla_attention
from cnc_jax.models.layers import Conv, GroupNorm

Dtype = Any


def _norm(name: str, dtype: Dtype) -> GroupNorm:
    return GroupNorm(32, 1e-6, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """ResnetBlock without time embedding (temb_channels=0 in the autoencoder); dropout is 0."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(nn.swish(_norm("norm1", self.dtype)(x)))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv2")(nn.swish(_norm("norm2", self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections; logits and softmax in float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm("norm", self.dtype)(x)
        q, k, v = (Conv(c, 1, padding=0, dtype=self.dtype, name=n)(h).reshape(b, hh * ww, 1, c) for n in "qkv")
        # on CPU in query chunks: XLA CPU runs the whole (hw, hw) softmax block 3x slower (64² x 512: 589 vs 187 ms)
        h = jax.lax.platform_dependent(q, k, v, cpu=partial(chunked_attention, scale=c ** -0.5),
                                       default=partial(xla_attention, scale=c ** -0.5))
        h = h.reshape(b, hh, ww, c)
        return x + Conv(c, 1, padding=0, dtype=self.dtype, name="proj_out")(h)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        h = Conv(cfg.ch, dtype=dt, name="conv_in")(x)
        res = cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for i in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg.ch * mult, dtype=dt, name=f"down_{level}_block_{i}")(h)
                if res in cfg.attn_resolutions:
                    h = AttnBlock(dtype=dt, name=f"down_{level}_attn_{i}")(h)
            if level != len(cfg.ch_mult) - 1:
                # Official Downsample: pad right/bottom by one, then a valid stride-2 conv.
                h = Conv(h.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), dtype=dt,
                         name=f"down_{level}_downsample")(h)
                res //= 2
        h = _mid(h, dt)
        h = nn.swish(_norm("norm_out", dt)(h))
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return Conv(z_out, dtype=dt, name="conv_out")(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        levels = len(cfg.ch_mult)
        h = Conv(cfg.ch * cfg.ch_mult[-1], dtype=dt, name="conv_in")(z)
        h = _mid(h, dt)
        res = cfg.resolution // 2 ** (levels - 1)
        # The official `up` list is indexed by level (0 = full resolution) but run from the deepest one.
        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg.ch * cfg.ch_mult[level], dtype=dt, name=f"up_{level}_block_{i}")(h)
                if res in cfg.attn_resolutions:
                    h = AttnBlock(dtype=dt, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Conv(h.shape[-1], upsample_input=True, dtype=dt, name=f"up_{level}_upsample")(h)
                res *= 2
        h = nn.swish(_norm("norm_out", dt)(h))
        return Conv(cfg.out_ch, dtype=dt, name="conv_out")(h)


def _mid(h, dtype: Dtype):
    """The `mid` stage shared by Encoder and Decoder; called inside their compact scope."""
    c = h.shape[-1]
    h = ResnetBlock(c, dtype=dtype, name="mid_block_1")(h)
    h = AttnBlock(dtype=dtype, name="mid_attn_1")(h)
    return ResnetBlock(c, dtype=dtype, name="mid_block_2")(h)


@flax.struct.dataclass
class DiagonalGaussian:
    """LDM's DiagonalGaussianDistribution over NHWC latents (a pytree, so jitted code can return it)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> jax.Array:
        """KL to N(0, I) per example (summed over H, W, C), as in the official training loss."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Images (B, H, W, in_channels) in [-1, 1] <-> latents (B, H/f, W/f, embed_dim), f = config.downsample_factor.

    Latents here are unscaled; LatentDiffusion multiplies them by `scale_factor` (0.18215) and
    divides by it before decoding.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        self.quant_conv = Conv(2 * cfg.embed_dim, 1, padding=0, dtype=self.dtype)
        self.post_quant_conv = Conv(cfg.z_channels, 1, padding=0, dtype=self.dtype)

    def encode(self, x) -> jax.Array:
        """Posterior moments (B, h, w, 2*embed_dim): [mean | logvar before clipping]."""
        return self.quant_conv(self.encoder(x))

    def posterior(self, x) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode(x))

    def decode(self, z) -> jax.Array:
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, rng: Optional[jax.Array] = None):
        """Reconstruction and posterior; samples the posterior when `rng` is given, else uses its mean."""
        posterior = self.posterior(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior
