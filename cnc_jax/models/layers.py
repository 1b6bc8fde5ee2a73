"""Basic linen layers with PyTorch semantics, NHWC, and logical axis names on every parameter.

Why our own instead of nn.Dense/nn.Conv/nn.GroupNorm: the official numbers need torch's exact
normalisation (two-pass variance, float32 statistics, per-layer epsilons), torch's default
initialisers (so layers we create from scratch start where the official code starts), and one
fixed set of logical axis names that `cnc_jax.sharding` maps to the device mesh.

Logical axes used here:
  conv kernels  ('conv_h', 'conv_w', 'conv_in', 'conv_out'), conv bias ('conv_out',)
  dense kernels ('dense_in', 'dense_out'),                   dense bias ('dense_out',)
  norm scale/bias ('norm',), embeddings ('vocab', 'embed')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Padding = Union[int, Sequence[tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter initialiser that can run in JAX (flax init) or in numpy (fast host-side init).

    kinds: 'zeros', 'ones', 'uniform' (U(-scale, scale): torch's nn.Linear / nn.Conv2d default with
    scale = 1/sqrt(fan_in)), 'normal' (N(0, scale^2): torch's nn.Embedding).
    """

    kind: str
    scale: float = 0.0

    def __call__(self, key, shape, dtype=jnp.float32):
        if self.kind == "zeros":
            return jnp.zeros(shape, dtype)
        if self.kind == "ones":
            return jnp.ones(shape, dtype)
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        return self.scale * jax.random.normal(key, shape, dtype)

    def numpy(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        if self.kind == "zeros":
            return np.zeros(shape, dtype)
        if self.kind == "ones":
            return np.ones(shape, dtype)
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, shape).astype(dtype)
        return (self.scale * rng.standard_normal(shape)).astype(dtype)


ZEROS, ONES = Init("zeros"), Init("ones")


def torch_uniform(fan_in: int) -> Init:
    """torch's default for nn.Linear / nn.Conv2d weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return Init("uniform", 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


@struct.dataclass
class InitialisedParam(nn.LogicallyPartitioned):
    """A parameter's box: its logical axis names (nn.LogicallyPartitioned) and the `Init` that made it, so a
    traced abstract tree (jax.eval_shape of `init`) says how to draw each leaf (`cnc_jax.models.params.fresh`)."""

    init: Optional[Init] = struct.field(default=None, pytree_node=False)


def _param(module: nn.Module, name: str, init: Init, shape, axes, dtype):
    return module.param(name, lambda key, *args: InitialisedParam(init(key, *args), axes, init=init), shape, dtype)


class Dense(nn.Module):
    """nn.Linear: y = x @ W + b with W stored (in, out)."""

    features: int
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = ZEROS if self.zero_init else torch_uniform(fan_in)
        kernel = _param(self, "kernel", init, (fan_in, self.features), ("dense_in", "dense_out"), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias_init = ZEROS if self.zero_init else torch_uniform(fan_in)
            bias = _param(self, "bias", bias_init, (self.features,), ("dense_out",), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """nn.Conv2d on NHWC input; kernel stored HWIO.

    `kernel_size` is an int or (kh, kw) (Inception's 1x7 / 7x1); `padding` is torch's symmetric int padding,
    or explicit ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: Union[int, tuple[int, int]] = 3
    stride: int = 1
    padding: Padding = 1
    dilation: int = 1
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        cin = x.shape[-1]
        fan_in = cin * kh * kw
        init = ZEROS if self.zero_init else torch_uniform(fan_in)
        kernel = _param(self, "kernel", init, (kh, kw, cin, self.features),
                        ("conv_h", "conv_w", "conv_in", "conv_out"), self.param_dtype)
        pad = ((self.padding, self.padding),) * 2 if isinstance(self.padding, int) else tuple(self.padding)
        if kh == kw == 1 and self.stride == 1 and pad == ((0, 0), (0, 0)):
            y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), pad,
                rhs_dilation=(self.dilation, self.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if not self.use_bias:
            return y
        bias = _param(self, "bias", init, (self.features,), ("conv_out",), self.param_dtype)
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """nn.GroupNorm over NHWC, statistics in float32 (as LDM's GroupNorm32), torch's two-pass variance."""

    num_groups: int = 32
    epsilon: float = 1e-5
    affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        xf = x.astype(jnp.float32)
        grouped = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if self.affine:
            scale = _param(self, "scale", ONES, (c,), ("norm",), self.param_dtype)
            bias = _param(self, "bias", ZEROS, (c,), ("norm",), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last axis, statistics in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = _param(self, "scale", ONES, (c,), ("norm",), self.param_dtype)
        bias = _param(self, "bias", ZEROS, (c,), ("norm",), self.param_dtype)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """nn.Embedding (torch initialises it N(0, 1))."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = _param(self, "embedding", Init("normal", 1.0), (self.num_embeddings, self.features),
                       ("vocab", "embed"), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of LDM's openaimodel: [cos, sin] (cos first), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def gelu_exact(x):
    """torch's F.gelu default (erf); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def nearest_upsample_2x(x):
    """F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
