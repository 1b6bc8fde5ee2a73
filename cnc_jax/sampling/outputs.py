"""A finished job on disk: one PNG per image, grid.png, the conditions and job.json (sample.py, demo.py)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from cnc_jax.io import to_uint8, write_png
from cnc_jax.sampling.jobs import PARTIAL_PREFIX

GLOBAL_STRENGTH_NOTE = ("global_strength (fg/bg_global_control) is applied at every guidance scale, also 1 (the "
                        "official sampler ignores it there)")


def job_info(job, pipeline, source: str, seconds: float) -> dict:
    """Everything job.json records: the settings, the weights, the devices and how each image was seeded."""
    return {"settings": job.spec.settings(), "manifest_line": job.spec.line, "checkpoint": source,
            "mode": pipeline.config.mode, "devices": pipeline.mesh.size, "batch_size": pipeline.batch_size,
            "process": jax.process_index(),
            "image_seeds": [f"fold_in(PRNGKey({job.spec.seed}), {i})" for i in range(job.spec.num_images)],
            "round_seconds": round(seconds, 2), "notes": [GLOBAL_STRENGTH_NOTE]}


def write_job(out_dir, job, images: np.ndarray, info: dict) -> str:
    """All files of a job into a temp folder, then one rename: a job folder is always complete, and a failed write
    (a full disk: OSError) leaves nothing of the job behind. Returns the folder.
    out_dir: any etils.epath path (local, gs://, ...)."""
    out_dir = epath.Path(out_dir)
    final = out_dir / job.spec.name
    tmp = out_dir / f"{PARTIAL_PREFIX}{job.spec.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        for i, image in enumerate(images):
            write_png(tmp / f"image_{i:03d}.png", image)
        write_png(tmp / "grid.png", np.concatenate(list(images), axis=1))
        for name in ("fg_depth", "bg_depth", "mask"):
            if name in job.conditions:
                write_png(tmp / f"{name}.png", to_uint8(job.conditions[name]))
        (tmp / "job.json").write_text(json.dumps(info, indent=1))
        if final.exists():
            final.rmtree()
        tmp.rename(final)
    finally:
        if tmp.exists():
            tmp.rmtree(missing_ok=True)
    return str(final)
