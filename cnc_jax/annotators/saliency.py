"""Salient-object masks: the official `GetSODMask` (utils/primitives.py) in JAX.

The official procedure, for a batch of images in [0, 1] (ToTensor() output, NO mean/std normalisation):
  1. if the image width is not 320: F.interpolate(size=(320, 320), mode='bilinear', align_corners=False)
     (no antialias, also when downsampling; the official code looks at the WIDTH only, so an
     image that is already 320 wide but not 320 high goes to the network unresized — kept here)
  2. d0 = U2NET(3, 1)(x)[0] (the fused map, after sigmoid)
  3. with a threshold (default 0.5): clamp(d0, 0, 1) > threshold -> {0., 1.}; threshold None skips
     both the clamp and the threshold (soft map), as the official `threshold=None`
  4. torchvision `transforms.Resize(size, InterpolationMode.BILINEAR)` of the (B, 1, 320, 320) tensor;
     an int size means (size, size) (the official wraps ints into a square, it does not keep the aspect)

So the default masks are {0, 1} away from object edges and fractional on the edges when the target
size differs from 320 (CnC later binarises with `.bool()`, i.e. any fractional edge is foreground).

Antialias (step 4). The official environment pins torchvision 0.12, where Resize on a TENSOR does
not antialias (`antialias=None` -> False): plain bilinear = `cnc_jax.models.resize.resize_bilinear`.
torchvision >= 0.17 defaults to `antialias=True` (torch's `_upsample_bilinear2d_aa`, a PIL-style
triangle filter widened by the downscale factor). The two agree (up to float rounding) whenever the
target is at least 320 in that dimension, e.g. the default 512; they differ only when DOWNsampling
the mask below 320. `antialias=False` (default) reproduces the official environment; `antialias=True`
reproduces torchvision >= 0.17 (`bilinear_aa_matrix`, torch's weights; see its docstring).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.checkpoint import load_annotator
from cnc_jax.models.resize import resize_bilinear
from cnc_jax.models.u2net import U2Net, U2NetConfig

NET_SIZE = 320
OFFICIAL_CONFIG = U2NetConfig("u2net", 3, 1)  # GetSODMask's U2NET(3, 1)
Size = Union[int, tuple[int, int]]


# ------------------------------------------------------------------ resizing


@functools.lru_cache(maxsize=None)
def bilinear_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 matrix of torch's antialiased bilinear resize along one axis (jax.image.resize's
    antialiased "linear" differs by up to 2.4e-6 relative, as cnc_jax.models.resize explains; tested)
    (F.interpolate(mode='bilinear', antialias=True, align_corners=False), = PIL's BILINEAR resample).

    scale = in/out; support = scale (downsampling) or 1 (upsampling); for output i the centre is
    scale*(i + 0.5), taps j in [trunc(centre - support + 0.5), trunc(centre + support + 0.5)) clipped
    to the input, weights triangle((j - centre + 0.5) / max(scale, 1)), normalised to sum 1.
    For upsampling this equals the plain bilinear matrix up to float rounding.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    support = scale if scale >= 1 else np.float32(1.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = scale * (np.float32(i) + np.float32(0.5))
        xmin = max(int(center - support + np.float32(0.5)), 0)
        xmax = min(int(center + support + np.float32(0.5)), in_size)
        j = np.arange(xmin, xmax)
        w = np.maximum(np.float32(1) - np.abs((j.astype(np.float32) - center + np.float32(0.5)) * invscale), 0)
        w = w.astype(np.float32)
        total = w.sum(dtype=np.float32)
        m[i, xmin:xmax] = w / total if total != 0 else w
    return m


def resize_bilinear_aa(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """F.interpolate(mode='bilinear', antialias=True) of NHWC images to `size` = (H, W)."""
    hp = jax.lax.Precision.HIGHEST
    mh = jnp.asarray(bilinear_aa_matrix(x.shape[1], size[0]))
    mw = jnp.asarray(bilinear_aa_matrix(x.shape[2], size[1]))
    y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,bowc->bopc", mw, y, precision=hp).astype(x.dtype)


def resize_mask(masks: jax.Array, size: Size, antialias: bool = False) -> jax.Array:
    """torchvision Resize(size, BILINEAR) of NHWC tensors (int size -> square, as GetSODMask passes it);
    antialias as torchvision <= 0.16 (False, the official env) or >= 0.17 (True)."""
    size = _pair(size)
    if tuple(masks.shape[1:3]) == size:
        return masks  # torchvision returns the tensor unchanged
    return resize_bilinear_aa(masks, size) if antialias else resize_bilinear(masks, size)


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or an (H, W) pair of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return pair


# ------------------------------------------------------------------ the pipeline (jitted in three pieces)
# Split so that the network compiles once per network-input shape (always B x 320 x 320 unless the
# official width-only check lets a 320-wide image through), whatever the threshold: the resizes
# before and after it are cheap and compile per image shape / target size.


@jax.jit
def _to_net_input(images: jax.Array) -> jax.Array:
    if images.shape[2] != NET_SIZE:  # the official checks the width (NCHW shape[-1]) only
        images = resize_bilinear(images, (NET_SIZE, NET_SIZE))
    return images


@functools.partial(jax.jit, static_argnames=("config",))
def _net_d0(params, x: jax.Array, config: U2NetConfig) -> jax.Array:
    return U2Net(config).apply({"params": params}, x)[0]


@jax.jit
def _threshold(d0: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(jnp.clip(d0, 0.0, 1.0) > threshold, 1.0, 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("size", "antialias"))
def _resize_out(mask: jax.Array, size: tuple[int, int], antialias: bool) -> jax.Array:
    return resize_mask(mask, size, antialias)


def check_images(images: Any, channels: int = 3) -> jax.Array:
    """Validate a batch of images (B, H, W, channels), floating point, values in [0, 1];
    returns it as a float32 jax array. Raises ValueError with the reason otherwise."""
    if not hasattr(images, "dtype") or not hasattr(images, "shape"):
        images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(f"images must be NHWC with {channels} channels (B, H, W, {channels}), "
                         f"got shape {tuple(images.shape)}")
    if min(images.shape[:3]) < 1:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point in [0, 1] (e.g. uint8 / 255), got dtype {images.dtype}")
    x = jnp.asarray(images, jnp.float32)
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
        raise ValueError(f"images must have values in [0, 1] (no mean/std normalisation), got [{lo}, {hi}]")
    return x


def saliency_mask(params, images, *, config: U2NetConfig = OFFICIAL_CONFIG, size: Size = 512,
                  threshold: Optional[float] = 0.5, antialias: bool = False) -> jax.Array:
    """The official GetSODMask(images, threshold, resize=size) with U2Net `params` of `config`.

    images: (B, H, W, 3) float in [0, 1]. Returns (B, size_h, size_w, 1) float32 masks.
    """
    size = _pair(size)
    x = _to_net_input(check_images(images, config.in_ch))
    mask = _net_d0(params, x, config)
    if threshold is not None:
        mask = _threshold(mask, jnp.float32(threshold))  # torch compares float32 maps with float32(threshold)
    return _resize_out(mask, size, bool(antialias))


class SaliencyMasker:
    """GetSODMask with fixed weights and settings: `SaliencyMasker(config, params)(images)` -> masks.

    images (B, H, W, 3) float in [0, 1] (numpy or jax) -> (B, H', W', 1) float32 jax array, where
    (H', W') = size (int -> square, default 512). threshold None = the soft (unclamped) d0 map.
    The network is compiled once per network-input shape (320 x 320), the resizes per image shape.
    """

    def __init__(self, config: U2NetConfig, params, size: Size = 512, threshold: Optional[float] = 0.5,
                 antialias: bool = False):
        self.config = config
        self.params = params
        self.size = _pair(size)
        self.threshold = None if threshold is None else float(threshold)
        self.antialias = bool(antialias)

    @classmethod
    def from_checkpoint(cls, path, config: Optional[U2NetConfig] = None, **kwargs) -> "SaliencyMasker":
        """From an official u2net.pth / u2netp.pth (variant detected from the shapes) or a converted folder."""
        config, params = load_annotator(os.fspath(path), "u2net", config)
        return cls(config, params, **kwargs)

    def d0(self, images) -> jax.Array:
        """The network's fused saliency map at network resolution (steps 1-2), before thresholding."""
        x = _to_net_input(check_images(images, self.config.in_ch))
        return _net_d0(self.params, x, self.config)

    def __call__(self, images) -> jax.Array:
        return saliency_mask(self.params, images, config=self.config, size=self.size,
                             threshold=self.threshold, antialias=self.antialias)
