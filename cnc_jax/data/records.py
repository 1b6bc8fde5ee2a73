"""One dataset record: raw bytes -> arrays with the official transforms (src/train/dataset_full.py).

A *raw* record (what every source yields, file tree or TFDS alike) is a dict:
  uid, caption, origin (str; origin names the source in messages)
  image, mask, fg_depth, bg_depth: the encoded file bytes (jpg / png) exactly as stored
  fg_emb, bg_emb: float32 arrays as read from the .pt files
  [latent_moments, text_embedding: float32, only in a cached TFDS build]
or a *skip marker* {"uid", "skip": "<file or field>: <reason>"} when something is missing or unreadable.

Official transforms, reproduced on uint8 data (torchvision runs them on PIL images):
  image     convert('RGB') if needed, Resize(R, BICUBIC) (shorter side, PIL antialiased), CenterCrop(R)
            -> later ToTensor + Normalize(0.5, 0.5), i.e. (u/255 - 0.5)/0.5
  depth     the same sizing, no Normalize (u/255); grayscale depth jpgs are expanded to 3 channels (the
            official code would hand a 1-channel map to the model; official files are RGB)
  mask      ToTensor of the png AS IS (u/255, one channel). The official masks are R x R; a mask of another
            size gets the image's Resize + CenterCrop (what data/get_foreground.py does to masks) so that it
            lines up with the image. Grayscale ('L') and 1-bit masks are accepted, other modes are errors.
  embedding .pt tensor squeezed to (C,).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from cnc_jax.annotators.images import dataset_transform

IMAGE_FIELDS = ("image", "mask", "fg_depth", "bg_depth")
EMBEDDING_FIELDS = ("fg_emb", "bg_emb")
CACHED_FIELDS = ("latent_moments", "text_embedding")


class RecordError(ValueError):
    """A record's file is missing or unreadable; the message names the file (or source field)."""


def skip_marker(uid: str, reason: str) -> dict:
    return {"uid": uid, "skip": reason}


def open_image(data: bytes, where: str):
    """A fully decoded PIL image from encoded bytes; RecordError naming `where` otherwise."""
    from PIL import Image

    if not data:
        raise RecordError(f"{where}: empty file")
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer)
        image.load()
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        reason = str(e).replace(f" {buffer!r}", "")  # "cannot identify image file <_io.BytesIO object at 0x...>"
        raise RecordError(f"{where}: not a readable image ({type(e).__name__}: {reason})") from None
    return image


def resize_crop(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) of a uint8 (H, W[, C]) image (identity at size²)."""
    if array.shape[:2] == (size, size):
        return array
    return dataset_transform(array, size)


def decode_rgb(data: bytes, size: int, where: str) -> np.ndarray:
    """Image or depth jpg -> uint8 (size, size, 3)."""
    image = open_image(data, where)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return resize_crop(np.asarray(image), size)


def decode_mask(data: bytes, size: int, where: str) -> np.ndarray:
    """Mask png -> uint8 (size, size, 1), as stored when already size x size."""
    image = open_image(data, where)
    if image.mode not in ("L", "1"):
        raise RecordError(f"{where}: mask of PIL mode {image.mode}; a grayscale ('L') png is expected")
    array = np.asarray(image.convert("L"))
    return resize_crop(array, size)[..., None]


def check_embedding(array, dim: int, where: str) -> np.ndarray:
    """Squeeze an embedding to (dim,) float32."""
    array = np.asarray(array, np.float32)
    squeezed = np.squeeze(array)
    if squeezed.shape != (dim,):
        raise RecordError(f"{where}: embedding of shape {array.shape}, expected ({dim},) after squeezing")
    if not np.all(np.isfinite(squeezed)):
        raise RecordError(f"{where}: embedding holds NaN or infinite values")
    return squeezed


def decode_record(raw: dict, size: int, emb_dim: int) -> dict:
    """A raw record -> uint8 images (size², masks (size, size, 1)), (emb_dim,) embeddings, caption, uid
    and any cached arrays; RecordError naming the bad file otherwise."""
    origin, uid = raw["origin"], raw["uid"]
    out = {"uid": uid, "caption": raw["caption"]}
    for field in IMAGE_FIELDS:
        where = f"{origin} {uid} {field}"
        out[field] = decode_mask(raw[field], size, where) if field == "mask" else decode_rgb(raw[field], size, where)
    for field in EMBEDDING_FIELDS:
        out[field] = check_embedding(raw[field], emb_dim, f"{origin} {uid} {field}")
    for field in CACHED_FIELDS:
        if field in raw:
            out[field] = np.asarray(raw[field], np.float32)
    return out


def image_to_unit(image: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 -> float32 in [0, 1] as ToTensor (u / 255 in float32), optionally into `out`."""
    return np.divide(image, np.float32(255.0), out=out, dtype=np.float32)


def image_to_signed(image: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] as ToTensor + Normalize(0.5, 0.5): (u / 255 - 0.5) / 0.5, float32 ops in that
    order (bit-identical to torchvision), optionally into `out`."""
    out = image_to_unit(image, out)
    out -= np.float32(0.5)
    out /= np.float32(0.5)
    return out


def to_pil_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 as torchvision ToPILImage does (x * 255, truncated), used by the official
    data scripts for masks and foregrounds (save_image instead rounds: cnc_jax.io.to_uint8)."""
    return (np.asarray(x, np.float32) * np.float32(255.0)).astype(np.uint8)
