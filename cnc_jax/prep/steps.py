"""The per-image dataset-preparation steps (the official data/get_*.py and parse_cocostuff.py) and the loop that
runs them resumably; `cnc_jax.cli.prepare` is their command line.

A Step loads one uid's inputs (RecordError naming the file if unreadable) and computes a batch of them into
one tuple of arrays per uid, written to layout fields. run_step skips uids whose outputs exist, writes files
atomically (temp file + rename), and keeps going past unreadable inputs (reported in the Report).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from cnc_jax.annotators.depth import normalize_depth
from cnc_jax.annotators.images import to_unit
from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.data.records import RecordError, decode_mask, decode_rgb, open_image, resize_crop, to_pil_uint8
from cnc_jax.data.sources import read_bytes
from cnc_jax.io import image_bytes, to_uint8, write_atomic
from cnc_jax.prep.triplets import dilate_mask, foreground_image, thing_mask
from cnc_jax.torchfile.torch_save import torch_bytes

# ---------------------------------------------------------------------------------------------- files


def encode_file(path: str, value) -> bytes:
    """The bytes of an output file: .png / .jpg from uint8 arrays (PIL defaults, as the official scripts
    save: JPEG quality 75), .pt from a float32 vector (torch.save format)."""
    if path.endswith(".pt"):
        return torch_bytes(np.asarray(value, np.float32), os.path.splitext(os.path.basename(path))[0])
    return image_bytes(np.asarray(value), "PNG" if path.endswith(".png") else "JPEG")


# ---------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Step:
    """A per-uid step: `load` one uid's inputs (RecordError if unreadable), `compute` a batch of them into
    one tuple of arrays per uid, written to `outputs`."""

    name: str
    outputs: Sequence[str]  # layout fields written, in the order compute returns them
    load: Callable[[SourceSpec, str], dict]
    compute: Callable[[list[str], list[dict]], list[tuple]]
    compiles: bool = False  # runs a model: its first batch compiles it (minutes on a CPU), and the bar says so


@dataclasses.dataclass
class Report:
    total: int = 0
    already_done: int = 0
    written: int = 0
    failed: dict = dataclasses.field(default_factory=dict)


def _load(step: Step, spec: SourceSpec, uid: str):
    try:
        return step.load(spec, uid)
    except RecordError as e:
        return e


def _write(step: Step, spec: SourceSpec, uid: str, values: tuple) -> None:
    for field, value in zip(step.outputs, values):
        path = spec.path(field, uid)
        write_atomic(path, encode_file(path, value))


def dataset_resolution(spec: SourceSpec) -> Optional[int]:
    """The side of the square maps a tree already holds (masks, foregrounds, ... as earlier steps or the synthetic
    generator wrote them), so later steps default to the tree's own resolution; None if it holds none."""
    for field in ("mask", "foreground", "background", "fg_depth", "bg_depth"):
        folder = spec.folder(field)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for name in names[:1]:
            try:
                with Image.open(os.path.join(folder, name)) as image:
                    width, height = image.size
            except OSError:
                continue
            if width == height:
                return width
    return None


def run_step(step: Step, spec: SourceSpec, *, batch_size: int = 8, shard: tuple[int, int] = (0, 1),
             threads: Optional[int] = None) -> Report:
    """Run `step` over the uids of spec's captions file that lack an output. Reading, decoding and writing run
    in a thread pool (PIL releases the GIL), the next batch loading while the models run on this one."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    records, _ = read_captions(spec.captions_file)
    uids = [uid for uid, _ in records][shard[0]::shard[1]]
    todo = [u for u in uids if not all(os.path.exists(spec.path(f, u)) for f in step.outputs)]
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    report = Report(total=len(uids), already_done=len(uids) - len(todo))
    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(uids), initial=report.already_done, desc=f"{step.name} {spec}", unit="img") as bar:
        def submit(i):
            return [(uid, pool.submit(_load, step, spec, uid)) for uid in chunks[i]] if i < len(chunks) else []

        pending = submit(0)
        for i in range(len(chunks)):
            loaded, pending = [(uid, future.result()) for uid, future in pending], submit(i + 1)
            for uid, error in ((u, x) for u, x in loaded if isinstance(x, RecordError)):
                report.failed[uid] = str(error)
                tqdm.write(f"error: {error}", file=sys.stderr)
            good = [(u, x) for u, x in loaded if not isinstance(x, RecordError)]
            if i == 0 and step.compiles and good:
                bar.set_postfix_str("first batch: compiling the model")
            outputs = step.compute([u for u, _ in good], [x for _, x in good]) if good else []
            if i == 0 and step.compiles:
                bar.set_postfix_str("")
            for future in [pool.submit(_write, step, spec, u, values) for (u, _), values in zip(good, outputs)]:
                future.result()
            report.written += len(good)
            bar.update(len(chunks[i]))
    return report


# ---------------------------------------------------------------------------------------------- steps


def _image(spec, uid, size, field="image"):
    return decode_rgb(read_bytes(spec.path(field, uid)), size, spec.path(field, uid))


def _mask(spec, uid, size):
    return decode_mask(read_bytes(spec.path("mask", uid)), size, spec.path("mask", uid))


def cocostuff_mask_step(annotations_dir: str, size: int) -> Step:
    """data/get_mask_cocostuff.py: stuffthing label map -> Resize/CenterCrop (bicubic, on the label image as
    the official does) -> 255 where the label is a thing (0..90)."""

    def load(spec, uid):
        path = os.path.join(annotations_dir, f"{uid}.png")
        labels = np.asarray(open_image(read_bytes(path), path))
        if labels.ndim != 2:
            raise RecordError(f"{path}: a label map must have one channel, got shape {labels.shape}")
        return {"labels": resize_crop(labels, size)}

    return Step("masks-cocostuff", ["mask"], load, lambda uids, xs: [(thing_mask(x["labels"]),) for x in xs])


def saliency_mask_step(masker, parallel, size: int, batch_size: int) -> Step:
    """data/get_mask_pickapic.py: GetSODMask of the [0,1] image, ToPILImage (truncating)."""
    def compute(uids, xs):
        masks = parallel.map(masker, to_unit(np.stack([x["image"] for x in xs])), size=batch_size)
        return [(to_pil_uint8(m),) for m in masks]

    return Step("masks-saliency", ["mask"], lambda spec, uid: {"image": _image(spec, uid, size)}, compute,
                compiles=True)


def foreground_step(size: int) -> Step:
    """data/get_foreground.py: image x mask."""

    def load(spec, uid):
        return {"image": _image(spec, uid, size), "mask": _mask(spec, uid, size)}

    return Step("foreground", ["foreground"], load,
                lambda uids, xs: [(foreground_image(x["image"], x["mask"]),) for x in xs])


def background_step(inpainter, size: int, batch_size: int, seed: int, dilation: int) -> Step:
    """data/get_background.py: dilate the mask, inpaint (see cnc_jax.prep.inpaint)."""
    import jax

    def load(spec, uid):
        return {"image": _image(spec, uid, size), "mask": dilate_mask(_mask(spec, uid, size)[..., 0], dilation)}

    def compute(uids, xs):
        keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(u.encode()) >> 1))
                         for u in uids])
        out = inpainter(np.stack([x["image"] for x in xs]), np.stack([x["mask"] for x in xs]), keys, batch_size)
        return [(image,) for image in out]

    return Step("background", ["background"], load, compute, compiles=True)


def primitives_step(embedder, estimator, parallel, size: int, batch_size: int) -> Step:
    """data/get_primitives.py: depth maps of the foreground and background images (per-image min-max: the
    official runs one image per batch), CLIP embeddings of the background and of the WHOLE image (the
    official fg embedding is not of the foreground image)."""
    import jax

    per_image = jax.jit(jax.vmap(lambda raw: normalize_depth(raw[None])[0]))

    def load(spec, uid):
        return {f: _image(spec, uid, size, f) for f in ("image", "foreground", "background")}

    def embed(images):
        return parallel.map(embedder.embed_pixels, embedder.preprocess(list(images)), size=batch_size)

    def depth(images):
        raw = parallel.map(estimator.predict, to_unit(images), size=batch_size)
        return to_uint8(np.asarray(per_image(raw)))

    def compute(uids, xs):
        image, fg, bg = (np.stack([x[f] for x in xs]) for f in ("image", "foreground", "background"))
        return list(zip(depth(fg), embed(image), depth(bg), embed(bg)))

    return Step("primitives", ["fg_depth", "fg_emb", "bg_depth", "bg_emb"], load, compute, compiles=True)


def coco_captions(coco_json: str, spec: SourceSpec) -> int:
    """data/parse_cocostuff.py: the first caption of every image present in {split}/ (line breaks -> spaces),
    `uid:caption` per line, uid = the 12-digit image id. Returns the number of lines written."""
    with open(coco_json) as f:
        annotations = json.load(f).get("annotations")
    if not isinstance(annotations, list):
        raise ValueError(f"{coco_json}: no 'annotations' list (not a COCO captions file)")
    lines, seen = [], set()
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise ValueError(f"{coco_json}: annotations[{i}] lacks 'image_id' or 'caption'")
        uid = str(annotation["image_id"]).zfill(12)
        if uid not in seen and os.path.exists(spec.path("image", uid)):
            seen.add(uid)
            caption = str(annotation["caption"]).replace("\n", " ").replace("\r", " ")
            lines.append(f"{uid}:{caption}\n")
    write_atomic(spec.captions_file, "".join(lines).encode("utf-8"))
    return len(lines)


