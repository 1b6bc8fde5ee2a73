"""Depth maps of user images: the official GetDepthMap procedure on our DPTForDepthEstimation.

The official code (utils/primitives.py GetDepthMap, with torch-hub MiDaS 'DPT_Large'; HF Intel/dpt-large is
its port) does exactly this, which we reproduce:

  1. the image in [0, 1] goes into the network as is: NO MiDaS mean/std normalisation and NO resize to 384
     (so H and W must be multiples of the patch size, 16 — we raise a ValueError otherwise);
  2. the (B, H, W) prediction is repeated to 3 channels;
  3. min-max normalisation over the WHOLE batch tensor (one min and one max for all images, not per image):
     depth -= min(depth); depth /= max(depth). The official `torch.clamp(depth, 0, 1)` result is discarded, so
     there is no clamp. (A constant prediction would divide 0 by 0 there; we return zeros instead of NaN.)

At sampling time (src/test/test_cnc.py `process`) the foreground depth has three variants, v1 = depth(fg
image), v2 = depth(fg image * mask) (the demo default), v3 = depth(fg image) * mask; the fg / bg depth
"controls" scale a map then clip it to [0, 1]; a missing image (None, or the official test `image.sum() == 0`
for an all-zero image) gives an all-zero depth map. Layout here: NHWC float, depth maps (B, H, W, 3).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.checkpoint import load_annotator
from cnc_jax.models.dpt import DPTConfig, DPTForDepthEstimation

DEPTH_VERSIONS = ("v1", "v2", "v3")
DEFAULT_DEPTH_VERSION = "v2"


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_images(images, patch_size: int, name: str = "images") -> jax.Array:
    """Validate NHWC float images in [0, 1] whose H, W are multiples of `patch_size`; returns float32."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        images = np.asarray(images)
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name}: expected NHWC RGB images (B, H, W, 3), got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name}: expected float images in [0, 1], got dtype {images.dtype} "
                         f"(convert uint8 with x / 255)")
    b, h, w, _ = shape
    if b < 1:
        raise ValueError(f"{name}: empty batch")
    if h % patch_size or w % patch_size or h < patch_size or w < patch_size:
        raise ValueError(f"{name}: height and width must be positive multiples of the DPT patch size "
                         f"{patch_size} (the official procedure does not resize), got {h}x{w}")
    if not _is_traced(images):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: values must lie in [0, 1] (no MiDaS normalisation is applied), "
                             f"got min {lo:g}, max {hi:g}")
    return jnp.asarray(images, jnp.float32)


def normalize_depth(predicted_depth: jax.Array) -> jax.Array:
    """(B, H, W) prediction -> (B, H, W, 3): min-max over the whole batch (no clamp, as the official code)."""
    depth = predicted_depth.astype(jnp.float32)
    depth = depth - jnp.min(depth)
    peak = jnp.max(depth)
    depth = jnp.where(peak > 0, depth / jnp.where(peak > 0, peak, 1.0), 0.0)
    return jnp.repeat(depth[..., None], 3, axis=-1)


class DepthEstimator:
    """images NHWC float in [0, 1] (H, W multiples of the patch size) -> depth maps (B, H, W, 3) in [0, 1].

    The parameters (`params`: the tree of DPTForDepthEstimation, i.e. convert_state_dict(...)["dpt"]) are
    put on the device once; the network and the normalisation run in one jitted function, compiled once per
    input shape. `fusion_upsampling` defaults to MiDaS v3.1's (the official torch-hub model), which keeps the
    output at the input size when H / 16 or W / 16 is odd; transformers' ("hf") differs only there (see
    DPTForDepthEstimation).
    """

    def __init__(self, config: DPTConfig, params: Any, *, dtype=jnp.float32, fusion_upsampling: str = "midas"):
        self.config = config
        self.model = DPTForDepthEstimation(config, dtype=dtype, fusion_upsampling=fusion_upsampling)
        self.params = jax.device_put(params)
        self._run = jax.jit(self._raw_and_normalized)

    def _raw_and_normalized(self, params, images):
        raw = self.model.apply({"params": params}, images).astype(jnp.float32)
        return raw, normalize_depth(raw)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, config: Optional[DPTConfig] = None,
                        **kwargs) -> "DepthEstimator":
        """From a transformers folder (config.json + weights) of a DPTForDepthEstimation (e.g. Intel/dpt-large),
        a torch-hub MiDaS DPT file (dpt_large_384.pt, what the official GetDepthMap loads; default config
        cnc_jax.checkpoint.midas.MIDAS_DPT_LARGE), or a folder converted by convert_torch_weights.py."""
        config, params = load_annotator(os.fspath(path), "dpt", config)
        return cls(config, params, **kwargs)

    def predict(self, images) -> jax.Array:
        """The raw network output (B, H, W) float32 (HF `predicted_depth`), no normalisation."""
        return self._run(self.params, check_images(images, self.config.patch_size))[0]

    def __call__(self, images) -> jax.Array:
        """Depth maps (B, H, W, 3) in [0, 1], min-max normalised over the whole batch."""
        return self._run(self.params, check_images(images, self.config.patch_size))[1]


def _is_missing(image) -> bool:
    """None, or all zeros (the official `image.sum().item() == 0` test for a missing input)."""
    return image is None or (not _is_traced(image) and not bool(jnp.any(jnp.asarray(image) != 0)))


def zero_depth(shape: Sequence[int]) -> jax.Array:
    """The depth map of a missing image: zeros (B, H, W, 3) for shape (B, H, W[, C])."""
    b, h, w = tuple(shape)[:3]
    return jnp.zeros((b, h, w, 3), jnp.float32)


def image_depth(estimator: DepthEstimator, image, *, shape: Optional[Sequence[int]] = None) -> jax.Array:
    """Depth map of an image (the background path): estimator(image), or zeros for a missing image.

    For image=None, `shape` = (B, H, W) of the zero map is required.
    """
    if image is None:
        if shape is None:
            raise ValueError("image is None: give the shape (B, H, W) of the zero depth map")
        return zero_depth(shape)
    image = check_images(image, estimator.config.patch_size, "image")
    if _is_missing(image):
        return zero_depth(image.shape)
    return estimator(image)


def _check_mask(mask, images_shape: tuple[int, ...]) -> jax.Array:
    """Mask (B|1, H, W), (B|1, H, W, 1) or (B|1, H, W, 3) with values in [0, 1] -> float32 broadcastable to images."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    shape = tuple(mask.shape)
    if len(shape) == 3:
        mask = mask[..., None]
        shape = shape + (1,)
    b, h, w, _ = images_shape
    if len(shape) != 4 or shape[-1] not in (1, 3) or shape[1:3] != (h, w) or shape[0] not in (1, b):
        raise ValueError(f"mask: expected (B, H, W), (B, H, W, 1) or (B, H, W, 3) with B in (1, {b}) and "
                         f"H, W = {h}, {w} (the image's), got shape {tuple(mask.shape)}")
    mask = jnp.asarray(mask, jnp.float32)
    if not _is_traced(mask):
        lo, hi = float(jnp.min(mask)), float(jnp.max(mask))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"mask: values must lie in [0, 1], got min {lo:g}, max {hi:g}")
    return mask


def foreground_depth(estimator: DepthEstimator, fg_image, mask, version: str = DEFAULT_DEPTH_VERSION) -> jax.Array:
    """Foreground depth map (B, H, W, 3) of the sampling-time procedure.

    v1 = depth(fg_image); v2 = depth(fg_image * mask) (the demo default); v3 = depth(fg_image) * mask.
    fg_image None (or all zeros) gives zeros of the mask's (B, H, W). `mask` is the foreground mask at the
    image's resolution, (B|1, H, W[, 1|3]) in [0, 1].
    """
    if version not in DEPTH_VERSIONS:
        raise ValueError(f"version must be one of {DEPTH_VERSIONS}, got {version!r}")
    if fg_image is None:
        if mask is None or not hasattr(mask, "shape") or len(mask.shape) not in (3, 4):
            raise ValueError("fg_image is None: the mask (B, H, W[, C]) gives the shape of the zero depth map")
        return zero_depth(mask.shape)
    fg_image = check_images(fg_image, estimator.config.patch_size, "fg_image")
    mask = _check_mask(mask, fg_image.shape)
    if _is_missing(fg_image):
        return zero_depth(fg_image.shape)
    if version == "v1":
        return estimator(fg_image)
    if version == "v2":
        return estimator(fg_image * mask)
    return estimator(fg_image) * mask


def apply_depth_control(depth, scale) -> jax.Array:
    """The fg / bg depth "controller" of the demo: clip(depth * scale, 0, 1) (scale a number, e.g. 0..2,
    or an array broadcastable to depth)."""
    scale = jnp.asarray(scale, jnp.float32)
    if not _is_traced(scale) and not bool(jnp.all(jnp.isfinite(scale))):
        raise ValueError(f"depth control scale must be finite, got {scale}")
    return jnp.clip(jnp.asarray(depth, jnp.float32) * scale, 0.0, 1.0)


__all__ = ["DepthEstimator", "DEPTH_VERSIONS", "DEFAULT_DEPTH_VERSION", "check_images", "normalize_depth",
           "image_depth", "foreground_depth", "apply_depth_control", "zero_depth"]
