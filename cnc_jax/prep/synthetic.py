"""Synthetic triplets for tests and demos: random scenes of shapes with exact masks and depths, written in the
official layout, so the whole data path runs without downloads.

A scene is a sky over a ground plane with 1-3 shapes (disc, box, triangle) standing on the ground. Depth is
"nearness" like MiDaS' inverse depth: sky 0, ground rising from the horizon to the bottom edge, each shape
one constant value just in front of the ground it stands on. Scene coordinates are relative to the central
square crop, so a scene renders exactly at any image size and at the R x R frame of the official
Resize + CenterCrop.

Layouts (`write_synthetic(..., layout=...)`):
  "full"      everything the training pipeline reads: images, {split}_captions.txt, masks (exact), foregrounds
              (image x mask, as `prepare foreground` computes them), backgrounds (the scene without its
              shapes: what inpainting should produce), exact depth maps (per-image min-max), .pt embeddings
              (random, seeded by uid)
  "coco"      the inputs of the COCO-Stuff steps: images, COCO captions JSON and stuffthing label maps in
              dirname(base_dir)/annotations/ (things = labels 0..90, person = 0; stuff 91..181; 255 unlabeled)
  "pickapic"  the inputs of the Pick-a-Pic steps: R x R images and {split}_captions.txt
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zlib
from typing import Sequence

import numpy as np
from PIL import Image

from cnc_jax.data.layout import SourceSpec
from cnc_jax.data.records import resize_crop
from cnc_jax.io import to_uint8, write_atomic
from cnc_jax.prep.triplets import foreground_image
from cnc_jax.torchfile.torch_save import torch_bytes

LAYOUTS = ("full", "coco", "pickapic")
SKY_LABEL, GROUND_LABEL, UNLABELED = 156, 123, 255
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
           "purple": (140, 60, 170), "white": (235, 235, 235)}
GROUNDS = {"grass": (70, 140, 60), "sand": (200, 180, 120), "snow": (225, 230, 235)}
SKIES = {"blue": (120, 170, 230), "grey": (160, 160, 170), "pink": (230, 150, 120)}
KINDS = ("disc", "box", "triangle")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cy: float  # centre, scene units (the central square crop is [0, 1]^2)
    cx: float
    size: float  # half extent
    label: int  # COCO-Stuff thing label (0..90)


@dataclasses.dataclass(frozen=True)
class Scene:
    sky: str
    ground: str
    horizon: float
    shapes: tuple[Shape, ...]  # far to near

    def caption(self) -> str:
        things = " and ".join(f"a {s.colour} {s.kind}" for s in self.shapes)
        return f"{things} on {self.ground} under a {self.sky} sky"


def random_scene(rng: np.random.Generator) -> Scene:
    horizon = float(rng.uniform(0.3, 0.5))
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        size = float(rng.uniform(0.08, 0.2))
        bottom = float(rng.uniform(horizon + 0.1, 0.95))
        shapes.append(Shape(str(rng.choice(KINDS)), str(rng.choice(list(COLOURS))), bottom - size,
                            float(rng.uniform(0.15, 0.85)), size, int(rng.integers(0, 91))))
    shapes.sort(key=lambda s: s.cy + s.size)  # lower on the ground = nearer = drawn later
    return Scene(str(rng.choice(list(SKIES))), str(rng.choice(list(GROUNDS))), horizon, tuple(shapes))


def _ground_nearness(y: np.ndarray, horizon: float) -> np.ndarray:
    return np.where(y >= horizon, 0.2 + 0.8 * (y - horizon) / (1.0 - horizon), 0.0)


def _inside(shape: Shape, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    dy, dx = y - shape.cy, x - shape.cx
    if shape.kind == "disc":
        return dy ** 2 + dx ** 2 <= shape.size ** 2
    if shape.kind == "box":
        return (np.abs(dy) <= shape.size) & (np.abs(dx) <= shape.size)
    return (np.abs(dy) <= shape.size) & (np.abs(dx) <= (dy + shape.size) / 2)  # apex up


def render(scene: Scene, y: np.ndarray, x: np.ndarray) -> dict:
    """Rendered maps at the scene points (y, x) (broadcast 2-D grids): image, background (uint8 RGB),
    labels (uint8), mask (bool), fg_nearness, bg_nearness (float32)."""
    sky = y < scene.horizon
    background = np.where(sky[..., None], SKIES[scene.sky], GROUNDS[scene.ground]).astype(np.float32)
    bg_near = _ground_nearness(y, scene.horizon).astype(np.float32)
    image, fg_near = background.copy(), np.zeros_like(bg_near)
    labels = np.where(sky, SKY_LABEL, GROUND_LABEL).astype(np.uint8)
    labels[(y < 0) | (y > 1) | (x < 0) | (x > 1)] = UNLABELED  # outside the crop: unlabeled, like COCO's gaps
    for shape in scene.shapes:
        inside = _inside(shape, y, x)
        image[inside] = COLOURS[shape.colour]
        fg_near[inside] = _ground_nearness(np.float64(shape.cy + shape.size), scene.horizon) + 0.05
        labels[inside] = shape.label
    return {"image": image.astype(np.uint8), "background": background.astype(np.uint8), "labels": labels,
            "mask": fg_near > 0, "fg_nearness": fg_near, "bg_nearness": bg_near}


def _grid(height: int, width: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of an image of height x width in scene units, the central side x side square = [0,1]²."""
    y = (np.arange(height) + 0.5 - (height - side) / 2) / side
    x = (np.arange(width) + 0.5 - (width - side) / 2) / side
    return np.meshgrid(y, x, indexing="ij")


def _depth_map(nearness: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1], 3 channels, rounded to uint8 like torchvision save_image."""
    d = nearness - nearness.min()
    d = d / d.max() if d.max() > 0 else d
    return to_uint8(np.repeat(d[..., None], 3, axis=-1))


def _uid(style: str, index: int, offset: int, rng: np.random.Generator) -> str:
    if style == "coco":
        return f"{offset + index + 1:012d}"
    h = rng.bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _save(path: str, array: np.ndarray, **kwargs) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG" if path.endswith(".png") else "JPEG", **kwargs)
    write_atomic(path, buffer.getvalue())


def write_synthetic(base_dir: str, split: str, count: int, *, layout: str = "full",
                    image_size: Sequence[int] = (96, 128), resolution: int = 64, emb_dim: int = 32,
                    seed: int = 0) -> list[str]:
    """Write `count` scenes into base_dir in the given layout (module docstring); returns their uids.

    Images are image_size (H, W) jpgs (the "pickapic" layout uses resolution², as parse_pickapic saves them);
    derived maps are resolution². COCO-style uids are zero-padded image ids (1000 * seed + 1, ...),
    Pick-a-Pic-style ones UUIDs.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = np.random.default_rng(seed)
    spec = SourceSpec(base_dir, split)
    height, width = (resolution, resolution) if layout == "pickapic" else tuple(image_size)
    full_grid, crop_grid = _grid(height, width, min(height, width)), _grid(resolution, resolution, resolution)
    annotations_dir = os.path.join(os.path.dirname(os.path.abspath(base_dir)), "annotations")
    uids, captions = [], []
    for index in range(count):
        scene = random_scene(rng)
        uid = _uid("hex" if layout == "pickapic" else "coco", index, 1000 * seed, rng)
        caption = scene.caption() if index % 4 else "photo: " + scene.caption()  # a ':' inside the caption
        uids.append(uid)
        captions.append(caption)
        full = render(scene, *full_grid)
        _save(spec.path("image", uid), full["image"], quality=95)
        if layout == "coco":
            _save(os.path.join(annotations_dir, split, f"{uid}.png"), full["labels"])
        if layout != "full":
            continue
        crop = render(scene, *crop_grid)
        mask = (crop["mask"] * 255).astype(np.uint8)[..., None]
        _save(spec.path("mask", uid), mask[..., 0])
        stored = resize_crop(np.asarray(Image.open(spec.path("image", uid)).convert("RGB")), resolution)
        _save(spec.path("foreground", uid), foreground_image(stored, mask))
        _save(spec.path("background", uid), crop["background"])
        _save(spec.path("fg_depth", uid), _depth_map(crop["fg_nearness"]))
        _save(spec.path("bg_depth", uid), _depth_map(crop["bg_nearness"]))
        emb_rng = np.random.default_rng([seed, zlib.crc32(uid.encode())])
        for field in ("fg_emb", "bg_emb"):
            path = spec.path(field, uid)  # torch names the archive inside after the file
            write_atomic(path, torch_bytes(emb_rng.standard_normal(emb_dim).astype(np.float32),
                                         os.path.splitext(os.path.basename(path))[0]))
    if layout == "coco":
        _write_coco_json(os.path.join(annotations_dir, f"captions_{split}.json"), uids, captions, height, width)
    else:
        write_atomic(spec.captions_file, "".join(f"{uid}:{caption}\n" for uid, caption in zip(uids, captions)).encode())
    return uids


def _write_coco_json(path: str, uids: list[str], captions: list[str], height: int, width: int) -> None:
    """COCO captions: two captions per image (the first one is used), one with a line break, and one
    annotation of an image that is not on disk (it must be ignored)."""
    images = [{"id": int(uid), "file_name": f"{uid}.jpg", "height": height, "width": width} for uid in uids]
    annotations = []
    for uid, caption in zip(uids, captions):
        annotations.append({"image_id": int(uid), "id": len(annotations), "caption": caption.replace(" on ", " on\n", 1)})
        annotations.append({"image_id": int(uid), "id": len(annotations), "caption": "another caption"})
    annotations.append({"image_id": 999999, "id": len(annotations), "caption": "an image that is not there"})
    write_atomic(path, json.dumps({"images": images, "annotations": annotations}).encode())
