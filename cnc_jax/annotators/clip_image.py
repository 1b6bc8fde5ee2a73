"""CLIP image embeddings of user images: transformers' CLIPImageProcessor (PIL backend) in numpy/PIL + our
CLIPVisionModelWithProjection.

The official code (utils/primitives.py GetCLIPImageEmbeddings) runs CLIPImageProcessor of
openai/clip-vit-large-patch14 and keeps `image_embeds` as fg_emb / bg_emb. The processor's steps, reproduced
here exactly (same PIL calls, same float64 -> float32 casts, so the pixels are bit-identical):

  1. convert to RGB (PIL images of any mode); by default the alpha channel is dropped as in transformers 4.29,
     the official environment (composite_alpha=True composites onto white, as newer transformers do);
  2. resize with PIL so that the SHORTER side is `size`; the longer side is int(size * long / short)
     (truncated, transformers' get_resize_output_image_size(default_to_square=False)); bicubic;
  3. center crop to crop_size: top = (H - crop_h) // 2, left = (W - crop_w) // 2 (zero padding, centred with
     ceil, when the image is smaller than the crop);
  4. rescale: (uint8 as float64 * 1/255) cast to float32;
  5. normalise: (x - mean) / std in float32.

Output is NHWC float32 (B, crop_h, crop_w, 3) — the layout our models take (HF returns NCHW).
"""

from __future__ import annotations

import os
from math import ceil
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cnc_jax.checkpoint import load_annotator
from cnc_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 224

ImageLike = Union[Image.Image, np.ndarray]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def to_rgb_array(image: ImageLike, *, composite_alpha: bool = False, index: Optional[int] = None) -> np.ndarray:
    """One image as a uint8 (H, W, 3) RGB array.

    PIL images of any mode are converted (transparency composited onto white with composite_alpha, as
    transformers' convert_to_rgb does; otherwise PIL's convert('RGB') drops it). Arrays must already be
    uint8 (H, W, 3) RGB; anything else raises ValueError naming the problem.
    """
    where = "image" if index is None else f"image {index}"
    if isinstance(image, Image.Image):
        if composite_alpha and ("A" in image.getbands() or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        array = np.array(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{where}: expected a uint8 RGB array (H, W, 3) with values 0..255, got dtype "
                             f"{image.dtype} (scale float images to 0..255 and cast to uint8 first)")
        if image.ndim == 2:
            raise ValueError(f"{where}: got a grayscale (H, W) array {image.shape}; pass an (H, W, 3) RGB array "
                             "or PIL.Image.fromarray(a).convert('RGB')")
        if image.ndim != 3 or image.shape[-1] != 3:
            kind = {1: "single-channel", 4: "RGBA", 2: "gray+alpha"}.get(image.shape[-1] if image.ndim == 3 else 0)
            detail = f" ({kind}; convert it with PIL first)" if kind else ""
            raise ValueError(f"{where}: expected an (H, W, 3) RGB array (channels last), got shape "
                             f"{image.shape}{detail}")
        array = image
    else:
        raise ValueError(f"{where}: expected a PIL.Image.Image or a uint8 (H, W, 3) numpy array, "
                         f"got {type(image).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {array.shape}")
    return array


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = shortest_edge and the longer int(shortest_edge * long / short)
    (transformers' get_resize_output_image_size(size=shortest_edge, default_to_square=False))."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(array: np.ndarray, size) -> np.ndarray:
    """transformers' center_crop on an (H, W, C) array, including its zero padding of too-small images."""
    crop_h, crop_w = _pair(size)
    h, w = array.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= h and left + crop_w <= w:
        return array[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w) + array.shape[2:], array.dtype)
    top_pad, left_pad = ceil((new_h - h) / 2), ceil((new_w - w) / 2)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _as_list(images) -> list:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:  # a batch (B, H, W, 3)
            return list(images)
        return [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


def preprocess(images: Union[Sequence[ImageLike], ImageLike], *, size: int = DEFAULT_SIZE,
               crop_size: Union[int, tuple[int, int]] = DEFAULT_SIZE, resample: int = Image.BICUBIC,
               rescale_factor: float = 1 / 255, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               composite_alpha: bool = False) -> np.ndarray:
    """CLIPImageProcessor(openai/clip-vit-large-patch14) pixels, NHWC float32 (B, crop_h, crop_w, 3).

    `images`: a sequence of PIL images / uint8 (H, W, 3) arrays (a single one, or a (B, H, W, 3) uint8
    array, is accepted too). size: the shorter side after resizing; crop_size: int or (h, w).
    """
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    out = []
    for i, image in enumerate(_as_list(images)):
        array = to_rgb_array(image, composite_alpha=composite_alpha, index=i)
        new_h, new_w = resize_output_size(array.shape[0], array.shape[1], int(size))
        array = np.array(Image.fromarray(array).resize((new_w, new_h), resample=resample))
        array = center_crop(array, crop_size)
        array = (array.astype(np.float64) * rescale_factor).astype(np.float32)
        out.append((array - mean32) / std32)
    return np.stack(out)


class CLIPImageEmbedder:
    """images -> CLIP image embeddings (B, projection_dim): `preprocess` + a jitted CLIPVisionModelWithProjection.

    The parameters are put on the device once; jax.jit compiles once per batch size. Preprocessing resizes
    the shorter side to config.image_size and crops config.image_size square (224 for ViT-L/14, as the
    official processor); other `preprocess` keyword arguments (mean, std, resample, composite_alpha) may be given.
    """

    def __init__(self, config: CLIPVisionConfig, params: Any, *, dtype=jnp.float32, **preprocess_kwargs):
        for key in ("size", "crop_size"):
            if key in preprocess_kwargs:
                raise ValueError(f"{key} follows config.image_size ({config.image_size}) and cannot be set")
        self.config = config
        self.model = CLIPVisionModelWithProjection(config, dtype=dtype)
        self.params = jax.device_put(params)
        self.preprocess_kwargs = dict(preprocess_kwargs, size=config.image_size, crop_size=config.image_size)
        self._forward = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "CLIPImageEmbedder":
        """From a transformers folder (config.json + weights) of a CLIPVisionModelWithProjection or a whole
        CLIPModel (e.g. openai/clip-vit-large-patch14), or a folder converted by convert_torch_weights.py."""
        config, params = load_annotator(os.fspath(path), "clip_vision")
        return cls(config, params, **kwargs)

    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, **self.preprocess_kwargs)

    def embed_pixels(self, pixel_values) -> jax.Array:
        """Already preprocessed NHWC pixels -> (B, projection_dim)."""
        return self._forward(self.params, jnp.asarray(pixel_values))

    def __call__(self, images) -> jax.Array:
        return self.embed_pixels(self.preprocess(images))


def image_embeddings(config: CLIPVisionConfig, params: Any, images, **preprocess_kwargs) -> jax.Array:
    """One-off convenience: CLIPImageEmbedder(config, params, ...)(images) (compiles each call; keep an
    embedder for repeated use)."""
    return CLIPImageEmbedder(config, params, **preprocess_kwargs)(images)


__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess", "to_rgb_array", "resize_output_size", "center_crop",
           "CLIPImageEmbedder", "image_embeddings"]
