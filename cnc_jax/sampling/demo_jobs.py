"""What the gradio demo (demo.py) does besides drawing the page: its controls as data, uploads -> a JobSpec,
one run of the pipeline -> images, the conditions gallery and a zip; no gradio in here, so it is testable.

The controls, labels, ranges and defaults are the official demo's (src/test/test_cnc.py); width and height
(multiples of 64) may differ, the prompt suffix is a checkbox (the official demo always appends it).
Validation is jobs.py's and the sampler's (its step grid); their messages are shown with the control's label.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from typing import Callable, Optional

import numpy as np

from cnc_jax.annotators.images import demo_resize
from cnc_jax.io import read_rgb_image, to_uint8
from cnc_jax.sampling.jobs import IMAGE_FIELDS, JobError, JobSpec, parse_job
from cnc_jax.sampling.outputs import job_info, write_job
from cnc_jax.sampling.sampler_names import DEFAULT_SAMPLER
from cnc_jax.sampling.samplers import get_sampler
from cnc_jax.validation import checked_number

DEFAULT_PROMPT = "a robot astronaut in front of a cyberpunk train"
SEED_RANGE = (0, 2 ** 31 - 1)  # what jobs.py accepts; the official demo draws from uint32


@dataclasses.dataclass(frozen=True)
class SliderSpec:
    label: str
    minimum: float
    maximum: float
    step: float
    value: float


# job field -> the official slider (label, range, default)
SLIDERS = {
    "fg_depth_control": SliderSpec("Foreground Depth Controller", 0, 2, 0.1, 1),
    "bg_depth_control": SliderSpec("Background Depth Controller", 0, 2, 0.1, 1),
    "fg_global_control": SliderSpec("Foreground Global Control", 0, 2, 0.1, 1),
    "bg_global_control": SliderSpec("Background Global Control", 0, 2, 0.1, 1),
    "size": SliderSpec("Image size", 512, 1024, 256, 768),
    "num_images": SliderSpec("Batch size", 1, 12, 1, 1),
    "steps": SliderSpec("Sampling steps", 1, 100, 1, 50),
    "cfg_scale": SliderSpec("CFG Scale", 1, 20, 0.5, 7.5),
    "seed": SliderSpec("Seed", -1, 65536, 1, -1),
}
IMAGE_LABELS = {"fg_image": "Foreground Image", "bg_image": "Background Image",
                "fg_emb_image": "Foreground Embedding Image", "bg_emb_image": "Background Embedding Image"}
OFFICIAL_EXAMPLES = {"fg_image": "247.jpg", "bg_image": "239.jpg", "fg_emb_image": "104.jpg",
                     "bg_emb_image": "324.jpg"}  # what the official demo opens with (its samples/demo/)
FIELD_LABELS = {**{k: s.label for k, s in SLIDERS.items()}, **IMAGE_LABELS, "size": "Width x Height",
                "prompt": "Prompt", "negative_prompt": "Negative Prompt", "depth_version": "Foreground Depth Version",
                "prompt_suffix": "Append the official prompt suffix", "sampler": "Sampler"}


class DemoError(ValueError):
    """Bad input, worded for the page (the demo shows it as gr.Error)."""


def step_counts_off_grid(diffusion, up_to: int = 100) -> list[int]:
    """The step counts in 1..up_to that the official uniform DDIM grid cannot make (as the ddim sampler says)."""
    bad = []
    for steps in range(1, up_to + 1):
        try:
            get_sampler(DEFAULT_SAMPLER).plan(diffusion, steps, 0.0)
        except ValueError:
            bad.append(steps)
    return bad


def convert_upload(image, label: str):
    """A PIL upload -> (RGB PIL image, notice or None). Lossless conversions only; else DemoError with why.

    The annotators want RGB. Grayscale and palette images convert exactly; an alpha channel is dropped only if
    every pixel is opaque (what lies under transparent pixels is undefined, so such images are refused).
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "RGB":
            return image, f"{label}: palette image converted to RGB"
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise DemoError(f"{label}: the image has transparent pixels ({(alpha < 255).mean():.0%} of it), and "
                            "what lies under them is undefined; flatten it onto a background and upload an RGB image")
        return image.convert("RGB"), f"{label}: fully opaque {mode} image, alpha channel dropped"
    if image.mode == "L":
        return image.convert("RGB"), f"{label}: grayscale image converted to RGB (gray in all three channels)"
    raise DemoError(f"{label}: PIL mode {image.mode} images are not supported; upload an RGB (or grayscale) image")


def _finite(label: str, value):
    """`value` (an int stays an int) if it is a finite number; DemoError naming the control otherwise."""
    try:
        return checked_number(value, int if isinstance(value, int) else float)
    except ValueError as error:
        raise DemoError(f"{label}: {error}") from None


def job_record(values: dict) -> dict:
    """The page's values (job field names; 'height'/'width' instead of 'size') -> a jobs.py record."""
    record = dict(values)
    for field in ("fg_depth_control", "bg_depth_control", "fg_global_control", "bg_global_control", "num_images",
                  "steps", "cfg_scale", "seed", "height", "width"):
        if field in record:
            record[field] = _finite(FIELD_LABELS.get(field, field.capitalize()), record[field])
    if "height" in record or "width" in record:
        width, height = record.pop("width", None), record.pop("height", None)
        numbers = all(isinstance(v, (int, float)) for v in (width, height))
        if numbers and (width % 64 or height % 64):  # worded as the page shows them (jobs.py says H x W)
            raise DemoError(f"{FIELD_LABELS['size']}: {width:g}x{height:g}: both must be multiples of 64")
        record["size"] = [height, width]
    return record


def build_job(values: dict, diffusion) -> JobSpec:
    """Validate the page's values with jobs.py (and the sampler's step grid); DemoError names the control."""
    try:
        spec = parse_job(job_record(values), 1, os.getcwd())
        try:
            get_sampler(spec.sampler).plan(diffusion, spec.steps, spec.eta)
        except ValueError as e:  # for the official grid, say which counts work
            bad = ", ".join(map(str, step_counts_off_grid(diffusion)))
            hint = f". With ddim every count in 1..100 works except {bad}" if spec.sampler == DEFAULT_SAMPLER else ""
            raise JobError(1, "steps", f"{e}{hint}") from None
    except JobError as e:
        raise _for_page(e) from None
    return dataclasses.replace(spec, name=f"cnc-seed{spec.seed}")


def _for_page(e: JobError) -> DemoError:
    """jobs.py's 'line 1, field 'x': why' -> 'Label of x: why'."""
    return DemoError(f"{FIELD_LABELS.get(e.field, e.field or 'job')}: {e.reason}")


def gridlines(image: np.ndarray) -> np.ndarray:
    """The official demo's add_gridlines: white 3x3 grid lines, 10 px (thinner below 512 px, where 10 px would
    hide the image), so the fg/bg embedding images read as the global (whole-image) conditions they are."""
    out = image.copy()
    h, w = out.shape[:2]
    t = 10 if min(h, w) >= 512 else max(2, min(h, w) // 50)
    for k in (1, 2):
        out[k * h // 3 - t // 2:k * h // 3 + t // 2] = 255
        out[:, k * w // 3 - t // 2:k * w // 3 + t // 2] = 255
    return out


def conditions_gallery(job, images: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The official demo's second gallery: fg depth, bg depth, embedding images with grid lines, mask, grid."""
    spec, hw = job.spec, (job.spec.height, job.spec.width)
    black = np.zeros(hw + (3,), np.uint8)
    out = []
    for name, caption in (("fg_depth", "foreground depth"), ("bg_depth", "background depth")):
        if name in job.conditions:
            out.append((to_uint8(job.conditions[name]), caption))
    for field, caption in (("fg_emb_image", "foreground embedding image"),
                           ("bg_emb_image", "background embedding image")):
        if "fg_emb" in job.conditions:
            path = getattr(spec, field)
            out.append((gridlines(demo_resize(read_rgb_image(path), hw)) if path else black, caption))
    if "mask" in job.conditions:
        out.append((np.repeat(to_uint8(job.conditions["mask"]), 3, axis=-1), "mask"))
    out.append((np.concatenate(list(images), axis=1), "image grid"))
    return out


def shape_key(spec: JobSpec) -> tuple:
    """What makes the sampler compile again: size, sampler, step count, guidance on/off (not prompt, seed or
    scale)."""
    return spec.height, spec.width, spec.sampler, spec.steps, spec.guided


def example_images(folder: Optional[str]) -> dict:
    """--examples DIR -> {image field: path}: the official demo's picks where present, else the folder's images."""
    if not folder:
        return {}
    if not os.path.isdir(folder):
        raise DemoError(f"--examples {folder}: no such folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
    picks = {f: n for f, n in OFFICIAL_EXAMPLES.items() if n in names}
    rest = [n for n in names if n not in picks.values()]
    for field in IMAGE_FIELDS:
        if field not in picks and rest:
            picks[field] = rest.pop(0)
    return {f: os.path.join(folder, n) for f, n in picks.items()}


@dataclasses.dataclass
class DemoResult:
    images: list  # (H, W, 3) uint8 each
    conditions: list  # [(image, caption)]
    seed: int
    zip_path: str
    status: str


class DemoRunner:
    """One pipeline, runs one job at a time (the page queues requests), remembers which shapes it compiled."""

    def __init__(self, pipeline, source: str, workdir: str, random_weights: bool = False):
        self.pipeline, self.source, self.workdir, self.random_weights = pipeline, source, workdir, random_weights
        self.compiled: set = set()
        self.runs = 0

    def run(self, values: dict, uploads: dict, notify: Callable[[str], None] = lambda m: None,
            progress: Callable[[float, str], None] = lambda f, d: None) -> DemoResult:
        """values: job fields from the page (seed -1 = random); uploads: {image field: PIL image or None}."""
        self.runs += 1
        folder = os.path.join(self.workdir, f"run-{self.runs:04d}")
        os.makedirs(folder)
        notices = []
        try:
            values = dict(values)
            for field, image in uploads.items():
                if image is None:
                    continue
                image, notice = convert_upload(image, IMAGE_LABELS[field])
                notices += [notice] if notice else []
                values[field] = os.path.join(folder, f"{field}.png")
                image.save(values[field])
            if values.get("seed") == -1:
                values["seed"] = random.randint(*SEED_RANGE)
            spec = build_job(values, self.pipeline.config.diffusion)
            key = shape_key(spec)
            first = key not in self.compiled
            if first:
                notify(f"First run of {spec.width}x{spec.height} (width x height), {spec.sampler}, {spec.steps} steps: "
                       "compiling the sampler for this shape (seconds to minutes); later runs of this shape start at once")
            t0 = time.time()
            progress(0.0, "compiling, then computing the conditions" if first else "computing the conditions")
            try:
                job = self.pipeline.prepare(spec)
            except JobError as e:
                raise _for_page(e) from None
            done = [0]

            def on_images(n):
                done[0] += n
                progress(done[0] / spec.num_images, f"sampled {done[0]}/{spec.num_images} images")

            progress(0.0, ("compiling and sampling" if first else "sampling") + f" {spec.num_images} images")
            images = self.pipeline.generate([job], on_images=on_images)[spec.name]
            if isinstance(images, JobError):  # images that are not finite: nothing to show or zip
                raise _for_page(images)
            seconds = time.time() - t0
            self.compiled.add(key)
            job_dir = write_job(folder, job, images, job_info(job, self.pipeline, self.source, seconds))
            zip_path = shutil.make_archive(job_dir, "zip", job_dir)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        status = [f"**Seed {spec.seed}**: {spec.num_images} image(s) of {spec.width}x{spec.height} (width x height), "
                  f"{spec.sampler}, {spec.steps} steps, in {seconds:.1f} s"
                  + (" (including compiling this shape)" if first else "")]
        if self.random_weights:
            status.append("Random weights (--random-init): the images are noise; this only exercises the pipeline.")
        return DemoResult(list(images), conditions_gallery(job, images), spec.seed, zip_path,
                          "  \n".join(status + notices))

