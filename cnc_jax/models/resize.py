"""Image resizing with PyTorch's exact semantics (F.interpolate, antialias=False), as matrices.

Why not jax.image.resize: its "linear" and "cubic-pytorch" kernels (antialias=False) are torch's, but it
computes the source positions as (i + 0.5) / (out / in) - 0.5 where torch computes (in / out) * (i + 0.5) - 0.5
in float32, so at ratios we use (512 -> 299 for Inception, any size -> 320 for U^2-Net, 320 -> 77) results
differ by 2e-6 to 4e-6 relative, and it has no align_corners (scale_and_translate: 1e-4); tests/test_resize.py
measures both. So resizes that must match the official code go through these per-axis interpolation
matrices, built in float32 exactly as torch computes its source indices and weights, and applied with
full-precision einsums (static shapes only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = np.float32(-0.75)  # torch's bicubic coefficient


def _source_scale(in_size: int, out_size: int, align_corners: bool) -> np.float32:
    if align_corners:
        return np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    return np.float32(in_size) / np.float32(out_size)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """(out, in) float32 matrix of torch's upsample_bicubic2d along one axis.

    Source index scale*(i+0.5)-0.5 (not clamped for cubic), 4 taps at floor-1..floor+2 clamped to
    the border, Keys' cubic convolution with A = -0.75.
    """
    scale, a = _source_scale(in_size, out_size, align_corners), _CUBIC_A
    m = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        real = scale * np.float32(o) if align_corners else scale * (np.float32(o) + np.float32(0.5)) - np.float32(0.5)
        base = int(np.floor(real))
        t = np.float32(real - np.float32(base))
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
        for tap, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[o, min(max(base - 1 + tap, 0), in_size - 1)] += np.float32(w)
    return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """(out, in) float32 matrix of torch's upsample_bilinear2d along one axis (negative sources clamp to 0)."""
    scale = _source_scale(in_size, out_size, align_corners)
    m = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        if align_corners:
            real = scale * np.float32(o)
        else:
            real = max(scale * (np.float32(o) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
        i0 = min(int(np.floor(real)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = np.float32(real - np.float32(i0))
        m[o, i0] += np.float32(1) - lam
        m[o, i1] += lam
    return m


def _resize(x: jax.Array, size: tuple[int, int], matrix, align_corners: bool, spatial_axes: tuple[int, int]):
    ah, aw = spatial_axes
    mh = jnp.asarray(matrix(x.shape[ah], size[0], align_corners))
    mw = jnp.asarray(matrix(x.shape[aw], size[1], align_corners))
    hp = jax.lax.Precision.HIGHEST
    y = jnp.moveaxis(jnp.tensordot(mh, x.astype(jnp.float32), axes=([1], [ah]), precision=hp), 0, ah)
    y = jnp.moveaxis(jnp.tensordot(mw, y, axes=([1], [aw]), precision=hp), 0, aw)
    return y.astype(x.dtype)


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """F.interpolate(mode='bilinear') of NHWC images to `size` = (H, W)."""
    return _resize(x, size, bilinear_matrix, align_corners, (1, 2))


def resize_bicubic(x: jax.Array, size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """F.interpolate(mode='bicubic') of (B, H, W) maps to `size` = (H, W)."""
    return _resize(x, size, bicubic_matrix, align_corners, (1, 2))
