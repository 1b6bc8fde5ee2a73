"""The two ways the official code sizes user images before annotating them.

* dataset_transform: the dataset scripts (data/get_primitives.py, src/train/dataset_*.py): torchvision
  Resize(size, BICUBIC) of a PIL image (shorter side -> size, PIL's antialiased bicubic) then
  CenterCrop(size) (torchvision rounds the offset).
* demo_resize: the demo (src/test/test_cnc.py): cv2.resize(image, (W, H)) with INTER_LINEAR, i.e. bilinear
  with half-pixel centres and no antialiasing, aspect ratio not kept. We compute it in float with torch's
  bilinear weights and round; cv2's 11-bit fixed-point arithmetic can differ by one grey level.
"""

from __future__ import annotations

import numpy as np

from cnc_jax.models.resize import bilinear_matrix


def dataset_transform(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: shorter side to `size` (bicubic), centre crop."""
    from PIL import Image

    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top:top + size, left:left + size]


def demo_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8, cv2.resize(INTER_LINEAR)-style."""
    h, w = image.shape[:2]
    rows = np.tensordot(bilinear_matrix(h, size[0]), image.astype(np.float32), axes=(1, 0))  # (oh, w, c)
    out = np.einsum("pw,owc->opc", bilinear_matrix(w, size[1]), rows, optimize=True)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (torchvision ToTensor, NHWC kept)."""
    return image.astype(np.float32) / 255.0
