"""Sampling jobs from a dataset tree in the official layout (`sample.py --from-dataset BASE_DIR:SPLIT`).

The paper's evaluation protocol: for every validation record, sample with ITS conditions (foreground and
background depth maps, CLIP embeddings, mask: the dataset's files) and its caption as the prompt. One job per
captions-file line, named by the uid, so evaluate.py pairs each generated image with the dataset's image and
conditions; a record whose condition files are missing is a JobError naming the uid and the file.
"""

from __future__ import annotations

import os
from typing import Optional

from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.sampling.jobs import NAME_MAX, JobError, parse_job

CONDITION_FILES = ("fg_depth", "bg_depth", "mask", "fg_emb", "bg_emb")  # job field = dataset field


def parse_dataset_spec(text: str) -> SourceSpec:
    """'BASE_DIR:SPLIT' -> SourceSpec; ValueError when it is not one (the folder or captions file missing)."""
    base, sep, split = text.rpartition(":")
    if not sep or not base or not split:
        raise ValueError(f"{text!r}: expected BASE_DIR:SPLIT (e.g. data/coco:val2017)")
    spec = SourceSpec(base, split)
    if not os.path.isfile(spec.captions_file):
        raise ValueError(f"{text}: no captions file {spec.captions_file}")
    return spec


def dataset_jobs(spec: SourceSpec, defaults: Optional[dict] = None, limit: Optional[int] = None,
                 name_max: int = NAME_MAX) -> tuple[list, list[JobError]]:
    """(jobs, errors) for the records of a dataset tree, in captions-file order; `limit` keeps the first ones.

    `line` of each job (and error) is its 1-based record number; `defaults` are the job flags; `name_max` is the
    output file system's limit on a name (a uid that cannot be a folder name there is that record's error).
    """
    records, _ = read_captions(spec.captions_file)
    records = records[:limit] if limit is not None else records
    jobs, errors = [], []
    for number, (uid, caption) in enumerate(records, start=1):
        record = {"prompt": caption, "name": uid}
        missing = [spec.path(f, uid) for f in CONDITION_FILES if not os.path.isfile(spec.path(f, uid))]
        if missing:
            errors.append(JobError(number, None, f"record {uid}: missing {', '.join(missing)}"))
            continue
        record.update({f: os.path.abspath(spec.path(f, uid)) for f in CONDITION_FILES})
        try:
            jobs.append(parse_job(record, number, spec.base_dir, defaults, name_max))
        except JobError as e:
            errors.append(e)
    return jobs, errors


__all__ = ["parse_dataset_spec", "dataset_jobs", "CONDITION_FILES"]
