"""pytorch-fid's FID InceptionV3 (`pt_inception-2015-12-05-6726825d.pth`), NHWC: pool3 (2048) and the 1008 logits.

FID / IS numbers are only comparable with published ones if the network is this exact variant, so we follow
pytorch_fid.inception (torchvision's Inception3 with the FID blocks) and not torchvision's own network:
  * input: images in [0, 1], bilinear resize to 299 (F.interpolate, align_corners=False), then x * 2 - 1;
  * FIDInceptionA / C / E_1: the pool branch is avg_pool2d(3, stride 1, pad 1, count_include_pad=False);
  * FIDInceptionE_2 (Mixed_7c): the pool branch is a MAX pool (the TF graph's quirk pytorch-fid reproduces);
  * BasicConv2d = conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU;
  * pool3 = global average of Mixed_7c; logits = fc(pool3) (1008 classes, the TF graph's).
Module names are the official ones (`Mixed_6b/branch7x7_2/conv`), so the name table has no rules for them.
`channel_divisor` > 1 shrinks every width (random-init smoke runs only; the real weights need 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import ConfigError
from cnc_jax.models import params as module_params
from cnc_jax.models.layers import Conv, Dense
from cnc_jax.models.resize import resize_bilinear
from cnc_jax.models.u2net import FrozenBatchNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """input_size: the side images are resized to (299); channel_divisor: 1 for the real network."""

    input_size: int = 299
    num_classes: int = 1008
    channel_divisor: int = 1

    def __post_init__(self):
        for name in ("input_size", "num_classes", "channel_divisor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.input_size < 75:
            raise ConfigError(f"input_size {self.input_size} is below InceptionV3's minimum of 75")
        if self.channel_divisor not in (1, 2, 4, 8):
            raise ConfigError(f"channel_divisor must be 1, 2, 4 or 8 (it divides every width), "
                              f"got {self.channel_divisor}")

    @property
    def pool_dim(self) -> int:
        return 2048 // self.channel_divisor


def max_pool(x, window: int = 3, stride: int = 2, padding: int = 0):
    """F.max_pool2d on NHWC (padding with -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x, window: int = 3, padding: int = 1):
    """F.avg_pool2d(window, stride=1, padding, count_include_pad=False) on NHWC: border windows divide by the
    number of real pixels they cover."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    dims, strides = (1, window, window, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, jnp.array(0, x.dtype), jax.lax.add, dims, strides, pad)
    return total / count


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps 0.001) -> ReLU."""

    features: int
    kernel_size: Any = 1
    stride: int = 1
    padding: Any = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = self.padding
        if isinstance(pad, tuple):  # torch's (pad_h, pad_w)
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        h = Conv(self.features, self.kernel_size, stride=self.stride, padding=pad, use_bias=False, dtype=self.dtype,
                 name="conv")(x)
        return nn.relu(FrozenBatchNorm(epsilon=1e-3, dtype=self.dtype, name="bn")(h))


class _Block(nn.Module):
    """Base of the Inception blocks: `conv(name, features, kernel, ...)` makes a named BasicConv2d."""

    divisor: int = 1
    dtype: Dtype = jnp.float32

    def conv(self, name, features, kernel=1, stride=1, padding=0):
        return BasicConv2d(features // self.divisor, kernel, stride, padding, dtype=self.dtype, name=name)


class FIDInceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = self.conv("branch_pool", self.pool_features)(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (torchvision InceptionB): grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class FIDInceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, torch padding)
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
        b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        for i, ((kernel, pad), out) in enumerate(zip((col, row, col, row), (c7, c7, c7, 192)), start=2):
            bd = self.conv(f"branch7x7dbl_{i}", out, kernel, padding=pad)(bd)
        bp = self.conv("branch_pool", 192)(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (torchvision InceptionD): grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class FIDInceptionE(_Block):
    """FIDInceptionE_1 (max_pool_branch=False: average pool without padding counts) or E_2 (a max pool)."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        def split(h, name):
            return [self.conv(f"{name}a", 384, (1, 3), padding=(0, 1))(h),
                    self.conv(f"{name}b", 384, (3, 1), padding=(1, 0))(h)]

        b1 = self.conv("branch1x1", 320)(x)
        b3 = split(self.conv("branch3x3_1", 384)(x), "branch3x3_2")
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(self.conv("branch3x3dbl_1", 448)(x))
        bd = split(bd, "branch3x3dbl_3")
        pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """images NHWC float in [0, 1] (any size) -> (pool3 (B, 2048), logits (B, 1008)), float32."""

    config: InceptionConfig = InceptionConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg, dt = self.config, self.dtype
        d = cfg.channel_divisor
        size = (cfg.input_size, cfg.input_size)
        x = images.astype(jnp.float32)
        if tuple(x.shape[1:3]) != size:
            x = resize_bilinear(x, size)
        x = (2 * x - 1).astype(dt)

        def conv(name, features, kernel, **kw):
            return BasicConv2d(features // d, kernel, dtype=dt, name=name, **kw)

        x = conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = max_pool(conv("Conv2d_2b_3x3", 64, 3, padding=1)(x))
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = max_pool(conv("Conv2d_4a_3x3", 192, 3)(x))
        kw = dict(divisor=d, dtype=dt)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features=pool_features, name=name, **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7=c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = FIDInceptionE(name="Mixed_7b", **kw)(x)
        x = FIDInceptionE(max_pool_branch=True, name="Mixed_7c", **kw)(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = Dense(cfg.num_classes, dtype=jnp.float32, name="fc")(pool3)
        return pool3, logits


def init_inputs(config: InceptionConfig, batch: int = 1) -> dict:
    return {"images": jnp.zeros((batch, config.input_size, config.input_size, 3), jnp.float32)}


def abstract_params(config: InceptionConfig, *, boxed: bool = False) -> dict:
    return module_params.trace(FIDInceptionV3(config), init_inputs(config), boxed=boxed)


def init_params(config: InceptionConfig, seed: int = 0) -> dict:
    """Random numpy parameters (torch default inits; BatchNorm statistics 0 / 1), for smoke runs."""
    return module_params.init(FIDInceptionV3(config), init_inputs(config), seed)


__all__ = ["InceptionConfig", "FIDInceptionV3", "abstract_params", "init_params", "max_pool", "avg_pool_exclude_pad"]
