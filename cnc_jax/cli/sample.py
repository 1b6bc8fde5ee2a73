"""Batch sampling with Compose and Conquer.

  python sample.py --checkpoint ckpt/cnc_v1 --tokenizer tokenizer/ --u2net ckpt/u2net --dpt ckpt/dpt \\
                   --clip-vision ckpt/clip_vision --manifest jobs.jsonl --out samples/
  python sample.py --checkpoint ckpt/cnc_v1 ... --prompt "a robot astronaut" --fg-image fg.jpg --out samples/
  python sample.py --random-init --out samples/smoke          # tiny random model, nothing to download
  python sample.py --checkpoint ckpt/cnc_v1 ... --from-dataset data/coco:val2017 --out samples/val   # paper protocol

One job per manifest line (JSON; fields in cnc_jax/sampling/jobs.py); job flags set the defaults of every
manifest job, or describe the single job without --manifest. Per job, <out>/<name>/ gets one PNG per image,
grid.png, the conditions (fg_depth.png, bg_depth.png, mask.png) and job.json with every setting used.
Finished jobs are skipped when re-run; a job's folder appears only when it is complete. Bad jobs are
reported by manifest line and field, the others still run, and the exit status is 1.

As several processes (one per host; --distributed, cnc_jax/distributed.py) the jobs still to do are dealt out
between them (job k to process k mod N), each samples its share on its own devices and writes those job
folders; the exit status is 1 on every process when a job failed on any. --out may be any etils.epath path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from etils import epath
from tqdm import tqdm

from cnc_jax import distributed
from cnc_jax.cli.model_flags import RANDOM_INIT_DEFAULTS, add_model_flags, convert_hint, load_errors, load_pipeline
from cnc_jax.platform import configure_cpu
from cnc_jax.sampling.dataset_jobs import dataset_jobs, parse_dataset_spec
from cnc_jax.sampling.jobs import JobError, parse_job, read_manifest
from cnc_jax.sampling.outputs import job_info, write_job
from cnc_jax.sampling.sampler_names import SAMPLER_NAMES

DEFAULT_PROMPT = "a photo"  # the job of a run with no --prompt, --manifest or --from-dataset

JOB_FLAGS = {  # job field (and --flag) -> type
    "prompt": str, "negative_prompt": str, "fg_image": str, "bg_image": str, "fg_emb_image": str,
    "bg_emb_image": str, "fg_depth": str, "bg_depth": str, "mask": str, "fg_emb": str, "bg_emb": str,
    "depth_version": str, "fg_depth_control": float, "bg_depth_control": float, "fg_global_control": float,
    "bg_global_control": float, "num_images": int, "sampler": str, "steps": int, "cfg_scale": float, "eta": float,
    "seed": int, "name": str,
}
SAMPLER_HELP = (f"one of {', '.join(SAMPLER_NAMES)} (default ddim, the official sampler; the table in README.md); "
                "eta applies to the ddim samplers only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="JSONL file, one job per line")
    p.add_argument("--from-dataset", metavar="BASE_DIR:SPLIT",
                   help="one job per record of a dataset tree: its depth maps, embeddings, mask and caption "
                        "(the paper's evaluation protocol; jobs are named by uid)")
    p.add_argument("--limit", type=int, default=None, help="--from-dataset: only the first N records")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs-per-round", type=int, default=32, help="jobs prepared and sampled together")
    add_model_flags(p)
    for flag, kind in JOB_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None,
                       help=SAMPLER_HELP if flag == "sampler" else None)
    p.add_argument("--prompt-suffix", action="store_true", default=None, help="append the demo's prompt suffix")
    p.add_argument("--size", type=int, nargs="+", default=None, help="S or H W (multiples of 64)")
    distributed.add_arguments(p)
    return p


def _job_defaults(args) -> dict:
    defaults = dict(RANDOM_INIT_DEFAULTS) if args.random_init else {}
    defaults.update({k: getattr(args, k) for k in JOB_FLAGS if getattr(args, k) is not None})
    if args.prompt_suffix:
        defaults["prompt_suffix"] = True
    if args.size:
        defaults["size"] = args.size[0] if len(args.size) == 1 else list(args.size)
    return defaults


def _is_done(out_dir: epath.Path, spec) -> bool:
    path = out_dir / spec.name / "job.json"
    return path.is_file() and json.loads(path.read_text()).get("settings") == spec.settings()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    configure_cpu()

    try:
        distributed.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not args.checkpoint and not args.random_init:
        print(f"error: {convert_hint('sample.py')}", file=sys.stderr)
        return 2
    defaults = _job_defaults(args)
    if args.manifest and args.from_dataset:
        print("error: give --manifest or --from-dataset, not both", file=sys.stderr)
        return 2
    if args.limit is not None and (not args.from_dataset or args.limit < 1):
        print("error: --limit N (N >= 1) goes with --from-dataset", file=sys.stderr)
        return 2
    if args.from_dataset:

        try:
            jobs, errors = dataset_jobs(parse_dataset_spec(args.from_dataset), defaults, args.limit)
        except ValueError as e:
            print(f"error: --from-dataset {e}", file=sys.stderr)
            return 2
    elif args.manifest:
        if not os.path.isfile(args.manifest):
            print(f"error: manifest {args.manifest}: no such file", file=sys.stderr)
            return 2
        jobs, errors = read_manifest(args.manifest, defaults)
    else:
        if "prompt" not in defaults:  # one job from the flags: the same default prompt for any weights
            defaults["prompt"] = DEFAULT_PROMPT
            print(f"no --prompt: sampling {DEFAULT_PROMPT!r}", file=sys.stderr)
        try:
            jobs, errors = [parse_job(defaults, 1, os.getcwd())], []
        except JobError as e:
            jobs, errors = [], [e]
    out = epath.Path(args.out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for entry in out.glob(".partial-*"):  # leftovers of an interrupted run
            entry.rmtree()
    distributed.barrier("sample.py: output folder ready")
    todo = [j for j in jobs if not _is_done(out, j)]
    for job in todo:
        other = out / job.name
        if other.exists():
            errors.append(JobError(job.line, "name", f"{other} exists with other settings; remove it or rename the job"))
    todo = [j for j in todo if not (out / j.name).exists()]
    distributed.barrier("sample.py: jobs listed")  # before any process writes a job folder
    mine = distributed.share(todo)
    if distributed.is_main():  # what every process found (the same manifest, the same folder)
        print(f"{len(jobs)} jobs: {len(jobs) - len(todo)} already done, {len(todo)} to run, {len(errors)} invalid")
        for e in sorted(errors, key=lambda e: e.line):
            print(f"error: {e}", file=sys.stderr)
    try:
        failed = run_jobs(args, mine) if mine else []
    except ModelsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in sorted(failed, key=lambda e: e.line):
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors or distributed.total(len(failed)) else 0


class ModelsError(ValueError):
    """The weights cannot be loaded: no job can run."""


def run_jobs(args, specs) -> list:
    """Sample the jobs; returns the JobErrors of those that failed. The checks that read no file run for every
    job before the first is sampled; a job that fails later leaves the progress total instead of filling it."""
    try:
        pipeline, source = load_pipeline(args)
    except load_errors() as e:
        raise ModelsError(f"cannot load the models: {e}") from None
    errors = []
    for spec in specs:
        try:
            pipeline.check(spec)
        except JobError as e:
            errors.append(e)
    failed_lines = {e.line for e in errors}
    specs = [s for s in specs if s.line not in failed_lines]
    progress = tqdm(total=sum(s.num_images for s in specs), unit="img", desc="sampling")
    for start in range(0, len(specs), args.jobs_per_round):
        prepared = []
        for spec in specs[start:start + args.jobs_per_round]:
            try:
                prepared.append(pipeline.prepare(spec))
            except JobError as e:
                errors.append(e)
                progress.total -= spec.num_images
                progress.refresh()
        t0 = time.time()
        images = pipeline.generate(prepared, on_images=progress.update) if prepared else {}
        seconds = time.time() - t0
        for job in prepared:
            info = job_info(job, pipeline, source, seconds)
            final = write_job(epath.Path(args.out), job, images[job.spec.name], info)
            print(f"process {info['process']}: wrote {final}")
    progress.close()
    return errors


if __name__ == "__main__":
    sys.exit(main())
