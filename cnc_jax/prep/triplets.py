"""The official triplet-making operations on arrays (data/get_*.py), shared by `prepare` and `synthetic`.

Masks and foregrounds go through torchvision ToTensor (u/255) and ToPILImage (x*255, truncated) there;
we do the same float32 arithmetic, so the files match bit for bit before JPEG encoding.
"""

from __future__ import annotations

import numpy as np

from cnc_jax.annotators.images import to_unit
from cnc_jax.data.records import to_pil_uint8

MAX_THING_LABEL = 90  # COCO-Stuff: 0..90 things (0 = person), 91..181 stuff, 255 unlabeled
DILATION = 50  # get_background.py: binary_dilation with a 50 x 50 square


def foreground_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """get_foreground.py: ToTensor(image) * ToTensor(mask) -> ToPILImage. image (H, W, 3), mask (H, W, 1) uint8."""
    return to_pil_uint8(to_unit(image) * to_unit(mask))


def thing_mask(labels: np.ndarray) -> np.ndarray:
    """get_mask_cocostuff.py: 255 where the (resized) label is a thing (0..90, person 0 included), else 0.
    The official chain (0 -> 90; keep < 91; (0, 91) -> 255) is exactly labels <= 90."""
    return np.where(labels <= MAX_THING_LABEL, 255, 0).astype(np.uint8)


def dilate_mask(mask: np.ndarray, size: int = DILATION) -> np.ndarray:
    """get_background.py: (mask == 255) dilated by a size x size square -> {0, 255} uint8 (H, W)."""
    from scipy.ndimage import binary_dilation

    dilated = binary_dilation(mask == 255, structure=np.ones((size, size), bool))
    return dilated.astype(np.uint8) * 255

