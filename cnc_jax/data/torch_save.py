"""Write one tensor as `torch.save(tensor, path)` does, without torch.

Why: the official dataset stores CLIP embeddings as torch `.pt` files (data/get_primitives.py), and our
prepare step and synthetic generator must write files that torch and our reader both load. The writer itself
is `cnc_jax.checkpoint.torch_save` (the one that also exports whole checkpoints).
"""

from __future__ import annotations

import io

import numpy as np

from cnc_jax.checkpoint.torch_save import save_torch, write_torch_zip


def tensor_file_bytes(array: np.ndarray, archive_name: str = "archive") -> bytes:
    """The bytes torch.save writes for `array` as a tensor (zip format)."""
    buffer = io.BytesIO()
    write_torch_zip(buffer, np.asarray(array), archive_name)
    return buffer.getvalue()


def save_tensor(path: str, array: np.ndarray) -> None:
    """torch.save(torch.from_numpy(array), path); the archive is named after the file, as torch names it."""
    save_torch(path, np.asarray(array))
