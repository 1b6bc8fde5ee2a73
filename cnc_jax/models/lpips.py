"""LPIPS (the lpips package, version 0.1): a torchvision trunk's ReLU taps compared through learned 1x1 heads.

lpips.LPIPS(net='alex' | 'vgg', version='0.1')(a, b) with a, b in [-1, 1]:
  scaling layer (x - shift) / scale -> trunk taps (5 ReLU outputs) -> unit-normalise each tap over channels
  (x / (||x|| + 1e-10)) -> squared difference -> linN (1x1 conv, no bias) -> spatial mean -> sum over taps.
The trunk is torchvision's `features` Sequential; module names are `features_<index>` (official
`features.3.weight`) and `lin<k>` (official `lin3.model.1.weight`), see cnc_jax.checkpoint.names.
`channel_divisor` > 1 shrinks every width (random-init smoke runs only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnc_jax.model_config import ConfigError
from cnc_jax.models import params as module_params
from cnc_jax.models.inception import max_pool
from cnc_jax.models.layers import Conv

Dtype = Any
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision `features` of each trunk: ("conv", index, out, kernel, stride, padding) | ("pool", window) |
# ("tap",) = one LPIPS feature (the ReLU output before it).
TRUNKS = {
    "alex": (("conv", 0, 64, 11, 4, 2), ("tap",), ("pool", 3), ("conv", 3, 192, 5, 1, 2), ("tap",), ("pool", 3),
             ("conv", 6, 384, 3, 1, 1), ("tap",), ("conv", 8, 256, 3, 1, 1), ("tap",),
             ("conv", 10, 256, 3, 1, 1), ("tap",)),
    "vgg": (("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), ("tap",), ("pool", 2),
            ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), ("tap",), ("pool", 2),
            ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), ("tap",), ("pool", 2),
            ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), ("tap",), ("pool", 2),
            ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), ("tap",)),
}


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    net: str = "alex"
    channel_divisor: int = 1

    def __post_init__(self):
        if self.net not in TRUNKS:
            raise ConfigError(f"LPIPS net {self.net!r} is not supported (one of {sorted(TRUNKS)})")
        if self.channel_divisor not in (1, 2, 4, 8):
            raise ConfigError(f"channel_divisor must be 1, 2, 4 or 8, got {self.channel_divisor!r}")


class LPIPSTrunk(nn.Module):
    """x (B, H, W, 3), already scaled -> the 5 ReLU taps."""

    config: LPIPSConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps = []
        for layer in TRUNKS[self.config.net]:
            if layer[0] == "conv":
                _, index, out, kernel, stride, pad = layer
                x = nn.relu(Conv(out // self.config.channel_divisor, kernel, stride=stride, padding=pad,
                                 dtype=self.dtype, name=f"features_{index}")(x))
            elif layer[0] == "pool":
                x = max_pool(x, layer[1], 2)
            else:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """(a, b) NHWC in [-1, 1] -> per-image distance (B,) float32."""

    config: LPIPSConfig = LPIPSConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, a, b):
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        trunk = LPIPSTrunk(self.config, dtype=self.dtype, name="trunk")
        n = a.shape[0]
        both = (jnp.concatenate([a, b]).astype(jnp.float32) - shift) / scale
        total = jnp.zeros((n,), jnp.float32)
        for k, tap in enumerate(trunk(both.astype(self.dtype))):
            tap = tap.astype(jnp.float32)
            tap = tap / (jnp.sqrt(jnp.sum(tap * tap, axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(tap[:n] - tap[n:])
            head = Conv(1, 1, padding=0, use_bias=False, name=f"lin{k}")(diff)
            total = total + jnp.mean(head[..., 0], axis=(1, 2))
        return total


def init_inputs(config: LPIPSConfig, batch: int = 1, size: int = 64) -> dict:
    x = jnp.zeros((batch, size, size, 3), jnp.float32)
    return {"a": x, "b": x}


def abstract_params(config: LPIPSConfig, *, boxed: bool = False) -> dict:
    return module_params.trace(LPIPS(config), init_inputs(config), boxed=boxed)


def init_params(config: LPIPSConfig, seed: int = 0) -> dict:
    """Random numpy parameters, for smoke runs (the real heads are non-negative; these are not)."""
    return module_params.init(LPIPS(config), init_inputs(config), seed)


__all__ = ["LPIPSConfig", "LPIPS", "TRUNKS", "abstract_params", "init_params"]
