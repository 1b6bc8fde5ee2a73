"""What evaluate.py reads: generated images (a sample.py output folder or any image folder) and the reference
(an image folder, a dataset tree `BASE_DIR:SPLIT`, or pytorch-fid statistics `.npz`).

Each image is an Item with a pairing `key`: the job folder's name for sample.py output (`--from-dataset` names
jobs by uid), the file stem otherwise. Captions come from job.json (the prompt) or the dataset's captions
file; depth conditions from the job folder (fg_depth.png, bg_depth.png, mask.png: what the sampler was given,
at the image size) or the dataset's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.data.records import RecordError, decode_mask, decode_rgb, open_image
from cnc_jax.data.sources import read_bytes
from cnc_jax.io import InputError, write_atomic
from cnc_jax.sampling.dataset_jobs import parse_dataset_spec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
JOB_CONDITIONS = {"fg_depth": "fg_depth.png", "bg_depth": "bg_depth.png", "mask": "mask.png"}


@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # for reports: the path relative to the folder given
    path: str
    key: str  # pairs a generated image with a reference image / conditions
    caption: Optional[str] = None
    conditions: tuple = ()  # ((field, path), ...) of fg_depth / bg_depth / mask


def _images_in(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _job_items(folder: str, base: str) -> list[Item]:
    with open(os.path.join(folder, "job.json")) as f:
        info = json.load(f)
    prompt = info.get("settings", {}).get("prompt")
    conditions = tuple((k, os.path.join(folder, v)) for k, v in JOB_CONDITIONS.items()
                       if os.path.isfile(os.path.join(folder, v)))
    key = os.path.basename(os.path.normpath(folder))
    return [Item(os.path.relpath(os.path.join(folder, f), base), os.path.join(folder, f), key, prompt, conditions)
            for f in sorted(os.listdir(folder)) if f.startswith("image_") and f.lower().endswith(IMAGE_EXTENSIONS)]


def generated_items(folder: str) -> tuple[list[Item], bool]:
    """(items, is_sample_output): the images of a sample.py output folder (its job folders' image_*.png), of
    one job folder, or every image under any other folder (sorted)."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, "job.json")):
        return _job_items(folder, folder), True
    jobs = [os.path.join(folder, d) for d in sorted(os.listdir(folder))
            if not d.startswith(".") and os.path.isfile(os.path.join(folder, d, "job.json"))]
    if jobs:
        return [item for job in jobs for item in _job_items(job, folder)], True
    return [Item(os.path.relpath(p, folder), p, os.path.splitext(os.path.basename(p))[0])
            for p in _images_in(folder)], False


@dataclasses.dataclass
class Reference:
    """kind 'images' | 'dataset' | 'stats'. `items` by key for pairing; `stats` = (mu, sigma) of an .npz."""

    kind: str
    text: str
    items: list = dataclasses.field(default_factory=list)
    stats: Optional[tuple[np.ndarray, np.ndarray]] = None
    spec: Optional[SourceSpec] = None

    def by_key(self) -> dict:
        return {item.key: item for item in self.items}


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid statistics (`mu`, `sigma`) from an .npz (theirs or our --save-stats)."""
    try:
        with np.load(path) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: not FID statistics with 'mu' and 'sigma' ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    return mu, sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
    """pytorch-fid's format (np.savez with mu, sigma), plus the image count; written atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, num_images=np.int64(num_images))
    write_atomic(path, buffer.getvalue())


def dataset_items(spec: SourceSpec) -> list[Item]:
    records, _ = read_captions(spec.captions_file)
    return [Item(os.path.relpath(spec.path("image", uid), spec.base_dir), spec.path("image", uid), uid, caption,
                 tuple((f, spec.path(f, uid)) for f in ("fg_depth", "bg_depth", "mask")
                       if os.path.isfile(spec.path(f, uid))))
            for uid, caption in records]


def parse_reference(text: str) -> Reference:
    """--reference: an .npz of statistics, a folder of images, or BASE_DIR:SPLIT. InputError otherwise."""
    if text.endswith(".npz"):
        if not os.path.isfile(text):
            raise InputError(f"{text}: no such statistics file")
        return Reference("stats", text, stats=load_stats(text))
    if os.path.isdir(text):
        return Reference("images", text, items=generated_items(text)[0])
    try:
        spec = parse_dataset_spec(text)
    except ValueError as e:
        raise InputError(f"--reference {text}: neither a folder, an .npz nor a BASE_DIR:SPLIT dataset tree "
                         f"({e})") from None
    return Reference("dataset", text, items=dataset_items(spec), spec=spec)


def read_image(path: str) -> np.ndarray:
    """Any PIL-readable image as uint8 (H, W, 3) (converted to RGB, as pytorch-fid does); InputError naming it."""
    try:
        image = open_image(read_bytes(path), path)
    except RecordError as e:
        raise InputError(str(e)) from None
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)


def read_resized(path: str, size: int, channels: int) -> np.ndarray:
    """A reference image (channels 3, uint8) or mask (channels 1) brought to size x size as the dataset
    pipeline does (cnc_jax.data.records: shorter side bicubic, centre crop)."""
    try:
        data = read_bytes(path)
        return decode_rgb(data, size, path) if channels == 3 else decode_mask(data, size, path)
    except RecordError as e:
        raise InputError(str(e)) from None


__all__ = ["Item", "Reference", "generated_items", "parse_reference", "load_stats", "save_stats", "read_image",
           "read_resized", "IMAGE_EXTENSIONS"]
