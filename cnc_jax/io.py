"""Reading and writing the files users hand to the scripts (images, maps, embeddings), with clear errors.

Every reader raises InputError naming the file and what is wrong with it; nothing here touches models.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator, Optional

import numpy as np
from etils import epath
from tqdm import tqdm

from cnc_jax.torchfile.state_dict import CheckpointError, load_raw


class InputError(ValueError):
    """A user-supplied file is missing, unreadable or of the wrong kind; the message names the file."""


_MODE_NAMES = {"L": "grayscale", "LA": "grayscale+alpha", "RGBA": "RGBA", "P": "palette", "CMYK": "CMYK",
               "I": "32-bit integer", "F": "floating-point", "1": "1-bit", "I;16": "16-bit grayscale"}


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    return image


def read_rgb_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8. Only RGB images are accepted: a grayscale / RGBA / palette image is an error, since
    silently converting it changes what the annotators see (convert it explicitly first)."""
    image = _open(path)
    if image.mode != "RGB":
        kind = _MODE_NAMES.get(image.mode, image.mode)
        raise InputError(f"{path}: a {kind} image (PIL mode {image.mode}); an RGB image is expected "
                         f"(e.g. convert it with PIL: Image.open(p).convert('RGB').save(...))")
    return np.asarray(image, np.uint8)


def read_map(path: str, channels: int) -> np.ndarray:
    """A precomputed depth map (channels=3) or mask (channels=1) as float32 (H, W, channels) in [0, 1].

    .npy files hold floats in [0, 1] ((H, W) or (H, W, C)); image files (png/jpg) are 8-bit, scaled by 1/255.
    """
    if path.endswith(".npy"):
        array = _numeric(path, _load_npy(path))
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            raise InputError(f"{path}: channels-first array {array.shape}; save it as (H, W[, C])")
        if (array.min() < 0 or array.max() > 1):
            raise InputError(f"{path}: values must lie in [0, 1] (found {array.min():.3g}..{array.max():.3g})")
    else:
        image = _open(path)
        if image.mode not in ("L", "RGB"):
            raise InputError(f"{path}: PIL mode {image.mode}; a grayscale or RGB 8-bit image is expected")
        array = np.asarray(image, np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise InputError(f"{path}: shape {array.shape} is not (H, W), (H, W, 1) or (H, W, 3)")
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if channels == 1 and array.shape[-1] == 3:
        array = array.mean(axis=-1, keepdims=True)
    return array


def read_embedding(path: str, dim: Optional[int] = None) -> np.ndarray:
    """A CLIP image embedding (.npy, or a torch .pt tensor as the official dataset stores them) -> (dim,)."""
    if path.endswith(".npy"):
        array = _load_npy(path)
    else:

        try:
            value = load_raw(path)
        except (CheckpointError, OSError) as e:
            raise InputError(f"{path}: cannot read an embedding ({e})") from None
        if not hasattr(value, "numpy"):
            raise InputError(f"{path}: holds a {type(value).__name__}, not a tensor")
        array = value.numpy()
    array = _numeric(path, array)
    if array.ndim > 1 and array.size == array.shape[-1]:  # (1, dim) as torch often stores them
        array = array.reshape(-1)
    if dim is not None and array.shape != (dim,):
        raise InputError(f"{path}: embedding of shape {array.shape}, expected ({dim},)")
    return array


def _numeric(path: str, array: np.ndarray) -> np.ndarray:
    """float32 of a numeric, non-empty, finite array; anything else (strings, objects, (0, 0), NaN / Inf: what
    would sample black images silently) is an InputError naming the file."""
    if array.dtype.kind not in "biuf" and not array.dtype.name.startswith(("bfloat16", "float8")):  # ml_dtypes
        raise InputError(f"{path}: holds {array.dtype} values, not numbers")
    if array.size == 0:
        raise InputError(f"{path}: empty array of shape {array.shape}")
    array = np.asarray(array, np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} of {array.size} values are not finite (NaN or Inf)")
    return array


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as torchvision's save_image does (x * 255 + 0.5, clamped)."""
    return np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def image_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """An (H, W), (H, W, 1) or (H, W, 3) uint8 array encoded with PIL's defaults (JPEG quality 75)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (os.umask sets it to read it, which
    would race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give a local file, or a folder and everything in it, the modes a plain open() / mkdir() would: temporary-file
    writers (tempfile.mkdtemp, safetensors' own temporary file) create 0700 folders and 0600 files."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            os.chmod(root, dir_mode)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), file_mode)
    elif os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, file_mode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(path) -> list:
    """Remove `<name>.partial-<pid>` siblings of `path` (what atomic_path leaves when its process is killed:
    gigabytes at full size) whose process is gone; a live writer's (another run at work) is left alone. Object
    stores have no process ids to ask: every partial there is stale. Returns the paths removed."""
    path = epath.Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    local = "://" not in str(path)
    for entry in path.parent.glob(f"{path.name}.partial-*"):
        pid = entry.name.rpartition(".partial-")[2]
        if local and (not pid.isdigit() or _pid_alive(int(pid))):
            continue
        if entry.is_dir() and not (local and os.path.islink(os.fspath(entry))):
            entry.rmtree(missing_ok=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path) -> Iterator[epath.Path]:
    """Yield a temporary path beside `path` to write a file or folder at; it becomes `path` (replacing what was
    there) only if the block succeeds, and is removed otherwise, so a failed write leaves nothing behind. What is
    written gets the modes of any plain file under the umask. Any etils.epath path (local, gs://, ...); writers
    that need a local file name use os.fspath of it. An OSError of the block that names no file (a write() on a
    full disk) is raised naming `path`."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = path.parent / f"{path.name}.partial-{os.getpid()}"
    try:
        try:
            yield tmp
        except OSError as e:  # a write() error names no file: a full or read-only disk must say which output
            if e.filename or not e.errno:
                raise
            raise OSError(e.errno, e.strerror, os.fspath(path)) from e
        if "://" not in str(tmp):
            follow_umask(os.fspath(tmp))
        if path.is_dir() and not os.path.islink(os.fspath(path)):  # a link is replaced, not what it points to
            path.rmtree()
        tmp.replace(path)
    finally:
        if tmp.is_dir():
            tmp.rmtree(missing_ok=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path, data: bytes) -> None:
    """Write a file so that it either exists complete or not at all (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_png(path, image: np.ndarray) -> None:
    """Write an (H, W), (H, W, 1) or (H, W, 3) uint8 array as PNG."""
    write_atomic(path, image_bytes(image))


def progress_bar(total_bytes: int, desc: str):
    """Bytes written so far (the full-size models are several GB)."""
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)
