"""U²-Net (`U2NET(3,1)`, used by the official GetSODMask) and its small sibling `U2NETP(3,1)`, NHWC.

Port of annotator/u2net/models/u2net.py. Module and parameter names are the official ones
(`stage1/rebnconvin/conv_s1/kernel`, `stage1/rebnconvin/bn_s1/{scale,bias,mean,var}`, `side1`,
`outconv`, ...), so `cnc_jax.checkpoint.names.U2NET_RULES` is the identity: the converter only maps
`weight` -> `kernel` (conv, OIHW -> HWIO) or `scale` (BatchNorm), `running_mean` -> `mean`,
`running_var` -> `var`, and drops `num_batches_tracked`.

Semantics kept from the official code:
  REBNCONV   3x3 conv with dilation d and padding d, BatchNorm (inference: running statistics,
             eps 1e-5), ReLU
  pooling    MaxPool2d(2, stride=2, ceil_mode=True): output ceil(H/2) x ceil(W/2)
  upsampling F.interpolate(mode='bilinear', align_corners=False) to the skip's size
             (`cnc_jax.models.resize.resize_bilinear`, torch's exact weights)
  outputs    (d0, d1, ..., d6), all after sigmoid; d0 is the fused map of outconv, d1..d6 the side
             outputs upsampled to the input size.

BatchNorm is inference-only here: its running statistics are ordinary parameters (`mean`, `var`),
so they are converted and sharded like any weight; there is no batch-statistics mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.models import layers
from cnc_jax.models import params as module_params
from cnc_jax.models.layers import Conv, logical_param
from cnc_jax.models.resize import resize_bilinear

Dtype = Any

VARIANTS = ("u2net", "u2netp")

# (module name, RSU height, mid channels, out channels) per stage; the input channels follow from the data.
# Height 4 with "F" (RSU4F) is the dilated variant without pooling. Encoder stages then decoder stages.
_STAGES = {
    "u2net": (
        ("stage1", "7", 32, 64), ("stage2", "6", 32, 128), ("stage3", "5", 64, 256), ("stage4", "4", 128, 512),
        ("stage5", "4F", 256, 512), ("stage6", "4F", 256, 512),
        ("stage5d", "4F", 256, 512), ("stage4d", "4", 128, 256), ("stage3d", "5", 64, 128),
        ("stage2d", "6", 32, 64), ("stage1d", "7", 16, 64),
    ),
    "u2netp": (
        ("stage1", "7", 16, 64), ("stage2", "6", 16, 64), ("stage3", "5", 16, 64), ("stage4", "4", 16, 64),
        ("stage5", "4F", 16, 64), ("stage6", "4F", 16, 64),
        ("stage5d", "4F", 16, 64), ("stage4d", "4", 16, 64), ("stage3d", "5", 16, 64),
        ("stage2d", "6", 16, 64), ("stage1d", "7", 16, 64),
    ),
}


@dataclasses.dataclass(frozen=True)
class U2NetConfig:
    """`variant` 'u2net' = official U2NET(in_ch, out_ch) (44.0M parameters at 3->1), 'u2netp' = U2NETP (1.1M)."""

    variant: str = "u2net"
    in_ch: int = 3
    out_ch: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"U2NetConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.in_ch < 1 or self.out_ch < 1:
            raise ValueError(f"U2NetConfig: in_ch and out_ch must be >= 1, got {self.in_ch}, {self.out_ch}")


# ------------------------------------------------------------------ building blocks


class FrozenBatchNorm(nn.Module):
    """nn.BatchNorm2d in eval mode: (x - mean) / sqrt(var + eps) * scale + bias, in float32.

    The running statistics are plain parameters (`mean`, `var`) so checkpoints fill them like weights.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = logical_param(self, "scale", layers.ONES, (c,), ("norm",), self.param_dtype).astype(jnp.float32)
        bias = logical_param(self, "bias", layers.ZEROS, (c,), ("norm",), self.param_dtype).astype(jnp.float32)
        mean = logical_param(self, "mean", layers.ZEROS, (c,), ("norm",), self.param_dtype).astype(jnp.float32)
        var = logical_param(self, "var", layers.ONES, (c,), ("norm",), self.param_dtype).astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class REBNCONV(nn.Module):
    """conv_s1 (3x3, dilation `dirate`) -> bn_s1 -> ReLU."""

    out_ch: int
    dirate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Conv(self.out_ch, 3, padding=self.dirate, dilation=self.dirate, dtype=self.dtype, name="conv_s1")(x)
        return nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn_s1")(h))


def max_pool_ceil(x: jax.Array) -> jax.Array:
    """MaxPool2d(2, stride=2, ceil_mode=True) on NHWC: odd sides are padded (bottom/right) with -inf."""
    _, h, w, _ = x.shape
    neg_inf = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, neg_inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                 ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def upsample_like(src: jax.Array, tar: jax.Array) -> jax.Array:
    """Official `_upsample_like`: F.interpolate(src, size=tar's H, W, mode='bilinear', align_corners=False)."""
    size = tuple(tar.shape[1:3])
    if tuple(src.shape[1:3]) == size:
        return src  # torch's bilinear at scale 1 is the identity
    return resize_bilinear(src, size)


class RSU(nn.Module):
    """Residual U-block RSU-L (L = `height` in 4..7): L-2 poolings, dilation 2 at the bottom.

    Submodules: rebnconvin, rebnconv1..rebnconvL, rebnconv{L-1}d..rebnconv1d (official names).
    """

    height: int
    mid_ch: int
    out_ch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        L, dt = self.height, self.dtype
        hxin = REBNCONV(self.out_ch, 1, dt, name="rebnconvin")(x)
        enc = []
        h = hxin
        for i in range(1, L):  # rebnconv1 .. rebnconv{L-1}, pooling after all but the last
            h = REBNCONV(self.mid_ch, 1, dt, name=f"rebnconv{i}")(h)
            enc.append(h)
            if i < L - 1:
                h = max_pool_ceil(h)
        d = REBNCONV(self.mid_ch, 2, dt, name=f"rebnconv{L}")(h)
        for i in range(L - 1, 0, -1):  # rebnconv{L-1}d .. rebnconv1d
            skip = enc[i - 1]
            if i < L - 1:
                d = upsample_like(d, skip)
            d = REBNCONV(self.out_ch if i == 1 else self.mid_ch, 1, dt, name=f"rebnconv{i}d")(
                jnp.concatenate([d, skip], axis=-1))
        return d + hxin


class RSU4F(nn.Module):
    """RSU-4F: no pooling, dilations 1, 2, 4, 8 and back 4, 2, 1."""

    mid_ch: int
    out_ch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        hxin = REBNCONV(self.out_ch, 1, dt, name="rebnconvin")(x)
        hx1 = REBNCONV(self.mid_ch, 1, dt, name="rebnconv1")(hxin)
        hx2 = REBNCONV(self.mid_ch, 2, dt, name="rebnconv2")(hx1)
        hx3 = REBNCONV(self.mid_ch, 4, dt, name="rebnconv3")(hx2)
        hx4 = REBNCONV(self.mid_ch, 8, dt, name="rebnconv4")(hx3)
        hx3d = REBNCONV(self.mid_ch, 4, dt, name="rebnconv3d")(jnp.concatenate([hx4, hx3], axis=-1))
        hx2d = REBNCONV(self.mid_ch, 2, dt, name="rebnconv2d")(jnp.concatenate([hx3d, hx2], axis=-1))
        hx1d = REBNCONV(self.out_ch, 1, dt, name="rebnconv1d")(jnp.concatenate([hx2d, hx1], axis=-1))
        return hx1d + hxin


def _stage(kind: str, mid: int, out: int, dtype: Dtype, name: str) -> nn.Module:
    if kind == "4F":
        return RSU4F(mid, out, dtype, name=name)
    return RSU(int(kind), mid, out, dtype, name=name)


# ------------------------------------------------------------------ the network


class U2Net(nn.Module):
    """U2NET / U2NETP. `__call__(x)`: x (B, H, W, in_ch) in [0, 1] (GetSODMask does not normalise),
    any H, W >= 1 -> (d0, d1, ..., d6), each (B, H, W, out_ch) float32 after sigmoid."""

    config: U2NetConfig = U2NetConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        if x.ndim != 4 or x.shape[-1] != cfg.in_ch:
            raise ValueError(f"U2Net expects NHWC input with {cfg.in_ch} channels, got shape {x.shape}")
        stages = {name: _stage(kind, mid, out, dt, name) for name, kind, mid, out in _STAGES[cfg.variant]}

        hx1 = stages["stage1"](x)
        hx2 = stages["stage2"](max_pool_ceil(hx1))
        hx3 = stages["stage3"](max_pool_ceil(hx2))
        hx4 = stages["stage4"](max_pool_ceil(hx3))
        hx5 = stages["stage5"](max_pool_ceil(hx4))
        hx6 = stages["stage6"](max_pool_ceil(hx5))

        cat = lambda a, b: jnp.concatenate([a, b], axis=-1)
        hx5d = stages["stage5d"](cat(upsample_like(hx6, hx5), hx5))
        hx4d = stages["stage4d"](cat(upsample_like(hx5d, hx4), hx4))
        hx3d = stages["stage3d"](cat(upsample_like(hx4d, hx3), hx3))
        hx2d = stages["stage2d"](cat(upsample_like(hx3d, hx2), hx2))
        hx1d = stages["stage1d"](cat(upsample_like(hx2d, hx1), hx1))

        side = lambda i: Conv(cfg.out_ch, 3, padding=1, dtype=dt, name=f"side{i}")
        d1 = side(1)(hx1d)
        ds = [d1] + [upsample_like(side(i)(h), d1) for i, h in zip(range(2, 7), (hx2d, hx3d, hx4d, hx5d, hx6))]
        d0 = Conv(cfg.out_ch, 1, padding=0, dtype=dt, name="outconv")(jnp.concatenate(ds, axis=-1))
        return tuple(jax.nn.sigmoid(d.astype(jnp.float32)) for d in [d0] + ds)


def U2NET(in_ch: int = 3, out_ch: int = 1, dtype: Dtype = jnp.float32) -> U2Net:
    """The official constructor name: `U2NET(3, 1)`."""
    return U2Net(U2NetConfig("u2net", in_ch, out_ch), dtype)


def U2NETP(in_ch: int = 3, out_ch: int = 1, dtype: Dtype = jnp.float32) -> U2Net:
    """The official constructor name: `U2NETP(3, 1)`."""
    return U2Net(U2NetConfig("u2netp", in_ch, out_ch), dtype)


# ------------------------------------------------------------------ helpers: inputs, trees, checkpoints


def init_inputs(config: U2NetConfig, batch: int = 1, size: int = 32) -> dict:
    """Example keyword arguments for `U2Net(config).init` (use under jax.eval_shape)."""
    return {"x": jnp.zeros((batch, size, size, config.in_ch), jnp.float32)}


def abstract_params(config: U2NetConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters (boxed: nn.Partitioned leaves with logical axis names)."""
    return module_params.trace(U2Net(config), init_inputs(config), boxed=boxed)


def init_params(config: U2NetConfig, seed: int = 0) -> dict:
    """Fresh numpy parameters (torch default inits), e.g. for random-weight smoke runs."""
    return module_params.init(U2Net(config), init_inputs(config), seed)



def _shapes(state_dict: Union[Mapping[str, Any], Iterable[tuple[str, Any]]]) -> dict[str, tuple[int, ...]]:
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    out = {}
    for key, value in items:
        shape = value.shape if hasattr(value, "shape") else value
        out[key] = tuple(int(s) for s in shape)
    return out


def detect_variant(state_dict_keys_and_shapes) -> str:
    """'u2net' or 'u2netp' from the shapes of an official state dict.

    Accepts {key: tensor / array / shape} or an iterable of (key, shape). Both variants have 64 output
    channels in stage1.rebnconvin, but stage1's mid channels differ: `stage1.rebnconv1.conv_s1.weight`
    is (32, 64, 3, 3) in U2NET and (16, 64, 3, 3) in U2NETP (stage2's output, 128 vs 64, agrees).
    """
    shapes = _shapes(state_dict_keys_and_shapes)
    key = "stage1.rebnconv1.conv_s1.weight"
    if key not in shapes:
        raise ValueError(f"not a U2NET/U2NETP state dict: no {key!r} entry")
    mid = shapes[key][0]
    stage2_out = shapes.get("stage2.rebnconvin.conv_s1.weight", (None,))[0]
    if mid == 32 and stage2_out in (None, 128):
        return "u2net"
    if mid == 16 and stage2_out in (None, 64):
        return "u2netp"
    raise ValueError(f"unknown U2-Net variant: {key} has shape {shapes[key]} and stage2.rebnconvin out channels "
                     f"{stage2_out} (U2NET: 32 / 128, U2NETP: 16 / 64)")


def detect_config(state_dict_keys_and_shapes) -> U2NetConfig:
    """The full U2NetConfig (variant, in_ch, out_ch) of an official state dict, from shapes only."""
    shapes = _shapes(state_dict_keys_and_shapes)
    variant = detect_variant(shapes)
    in_key, out_key = "stage1.rebnconvin.conv_s1.weight", "outconv.weight"
    if in_key not in shapes or out_key not in shapes:
        raise ValueError(f"not a U2NET/U2NETP state dict: needs {in_key!r} and {out_key!r}")
    return U2NetConfig(variant, in_ch=shapes[in_key][1], out_ch=shapes[out_key][0])


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
