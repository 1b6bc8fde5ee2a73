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
reported by manifest line and field (a full disk: by the job's folder), the others still run and are written,
and the exit status is 1; bad flags are refused before anything runs (exit status 2). What fails unexpectedly
in one job is that job's error, with its traceback in <out>/errors.log.

As several processes (one per host; --distributed, cnc_jax/distributed.py) the jobs still to do are dealt out
between them (job k to process k mod N), each samples its share on its own devices and writes those job
folders; the exit status is 1 on every process when a job failed on any. --out may be any etils.epath path.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import traceback

from etils import epath
from tqdm import tqdm

from cnc_jax import distributed
from cnc_jax.cli.model_flags import (RANDOM_INIT_DEFAULTS, add_model_flags, check_model_flags, convert_hint,
                                     load_errors, load_pipeline)
from cnc_jax.platform import configure_cpu
from cnc_jax.sampling.dataset_jobs import dataset_jobs, parse_dataset_spec
from cnc_jax.sampling.jobs import (NAME_MAX, PARTIAL_PREFIX, JobError, JobFault, check_flag_defaults, parse_job,
                                   read_manifest)
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


def _flag_error(e: JobError) -> str:
    """A job flag's JobError as the flag's error (the flags are no manifest line)."""
    return f"--{e.field.replace('_', '-')}: {e.reason}" if e.field else e.reason


def _name_max(out: str) -> int:
    """The output file system's limit on a name, in bytes (os.pathconf of --out or its nearest existing folder)."""
    if "://" in out:
        return NAME_MAX
    path = os.path.abspath(out)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        limit = os.pathconf(path, "PC_NAME_MAX")
    except (OSError, ValueError):  # not a POSIX system, or a file system that does not say
        return NAME_MAX
    return limit if limit > 0 else NAME_MAX


def _finished(out: epath.Path, spec) -> bool:
    """Whether <out>/<name> is this job, finished (skipped when re-run). JobError if a folder of that name is there
    but cannot be shown to be this job (other settings; a job.json that is missing, truncated or unreadable): it is
    never replaced, since it may be someone's work or a finished job damaged afterwards (folders appear only
    complete, so a bad job.json is never our own half-written one); the error says how to redo the job."""
    folder = out / spec.name
    if not folder.exists():
        return False
    try:
        info = json.loads((folder / "job.json").read_text())
    except (OSError, ValueError) as e:  # missing, a folder, unreadable, truncated, not UTF-8
        raise JobError(spec.line, "name", f"{folder} exists, but its job.json cannot be read ({type(e).__name__}: "
                                          f"{_one_line(e)}); remove the folder to redo the job") from None
    if not isinstance(info, dict) or info.get("settings") != spec.settings():
        raise JobError(spec.line, "name", f"{folder} exists with other settings; remove it or rename the job")
    return True


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs_per_round < 1:
            raise ValueError(f"--jobs-per-round: must be >= 1 (got {args.jobs_per_round})")
        check_model_flags(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
    name_max = _name_max(args.out)
    try:  # the job flags (defaults of every job) are refused before anything runs
        if args.manifest or args.from_dataset:
            check_flag_defaults(defaults, os.getcwd(), name_max)
        else:  # one job from the flags: the same default prompt for any weights
            if "prompt" not in defaults:
                defaults["prompt"] = DEFAULT_PROMPT
                print(f"no --prompt: sampling {DEFAULT_PROMPT!r}", file=sys.stderr)
            jobs, errors = [parse_job(defaults, 1, os.getcwd(), name_max=name_max)], []
    except JobError as e:
        print(f"error: {_flag_error(e)}", file=sys.stderr)
        return 2
    if args.from_dataset:
        try:
            jobs, errors = dataset_jobs(parse_dataset_spec(args.from_dataset), defaults, args.limit, name_max)
        except ValueError as e:
            print(f"error: --from-dataset {e}", file=sys.stderr)
            return 2
    elif args.manifest:
        try:
            if not os.path.isfile(args.manifest):
                raise FileNotFoundError(errno.ENOENT, "no such file")
            jobs, errors = read_manifest(args.manifest, defaults, name_max)
        except OSError as e:
            print(f"error: manifest {args.manifest}: {e.strerror or e}", file=sys.stderr)
            return 2
    out = epath.Path(args.out)
    try:
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            for entry in out.glob(f"{PARTIAL_PREFIX}*"):  # leftovers of an interrupted run
                entry.rmtree()
    except OSError as e:
        print(f"error: --out {out}: {e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    distributed.barrier("sample.py: output folder ready")
    todo, done = [], 0
    for job in jobs:
        try:
            if _finished(out, job):
                done += 1
            else:
                todo.append(job)
        except JobError as e:
            errors.append(e)
    distributed.barrier("sample.py: jobs listed")  # before any process writes a job folder
    mine = distributed.share(todo)
    if distributed.is_main():  # what every process found (the same manifest, the same folder)
        print(f"{len(jobs)} jobs: {done} already done, {len(todo)} to run, {len(errors)} invalid")
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


class FaultLog:
    """What went wrong unexpectedly in one job (a bug, or a library's own exception): the job's error line says
    the exception's type and message and where its traceback was kept (<out>/errors.log; one per process when
    there are several), so nothing is hidden while the other jobs run on."""

    def __init__(self, out: epath.Path):
        index, count = distributed.process_shard()
        self.path = out / ("errors.log" if count == 1 else f"errors-{index}.log")
        self.notes: dict = {}  # id of an exception already logged (a round's sampling error) -> its note

    def job_error(self, spec, e: Exception, doing: str) -> JobError:
        """The JobError to report for `e`, raised while `doing` the job of `spec`."""
        if isinstance(e, JobError) and not isinstance(e, JobFault):
            return e
        cause = e.__cause__ if isinstance(e, JobFault) and e.__cause__ is not None else e
        if id(cause) not in self.notes:
            try:
                with self.path.open("a") as f:
                    f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} line {spec.line} ({spec.name}), {doing}:\n")
                    f.write("".join(traceback.format_exception(cause)))
                self.notes[id(cause)] = f"traceback in {self.path}"
            except Exception as log_error:  # noqa: BLE001  a full disk: the error line is still shown
                self.notes[id(cause)] = f"its traceback could not be kept: {type(log_error).__name__}: " \
                                        f"{_one_line(log_error)}"
        note = self.notes[id(cause)]
        if isinstance(e, JobFault):
            return JobError(e.line, e.field, f"{e.reason} ({note})")
        return JobError(spec.line, None, f"{doing}: {type(e).__name__}: {_one_line(e)} ({note})")


def run_jobs(args, specs) -> list:
    """Sample the jobs; returns the JobErrors of those that failed. The checks that read no file run for every
    job before the first is sampled; a job that fails later leaves the progress total instead of filling it.
    Each job is isolated: whatever goes wrong while preparing, sampling or writing it is that job's error line,
    and the other jobs (those of its round too) are sampled and written."""
    try:
        pipeline, source = load_pipeline(args)
    except load_errors() as e:
        raise ModelsError(f"cannot load the models: {e}") from None
    out = epath.Path(args.out)
    log = FaultLog(out)
    errors = []
    checked = []
    for spec in specs:
        try:
            pipeline.check(spec)
            checked.append(spec)
        except Exception as e:  # noqa: BLE001  JobError; anything else is a bug, kept in the log
            errors.append(log.job_error(spec, e, "checking it"))
    progress = tqdm(total=sum(s.num_images for s in checked), unit="img", desc="sampling")
    for start in range(0, len(checked), args.jobs_per_round):
        prepared = []
        for spec in checked[start:start + args.jobs_per_round]:
            try:
                prepared.append(pipeline.prepare(spec))
            except Exception as e:  # noqa: BLE001  a bad file (JobError) or anything unexpected: this job only
                errors.append(log.job_error(spec, e, "preparing it"))
                progress.total -= spec.num_images
                progress.refresh()
        t0 = time.time()
        try:
            images = pipeline.generate(prepared, on_images=progress.update) if prepared else {}
        except Exception as e:  # noqa: BLE001  e.g. device memory: this round's jobs fail, the next run
            errors += [log.job_error(job.spec, e, "sampling it") for job in prepared]
            continue
        seconds = time.time() - t0
        for job in prepared:
            result = images[job.spec.name]
            if isinstance(result, JobError):  # images that are not finite are never written
                errors.append(result)
                continue
            try:
                info = job_info(job, pipeline, source, seconds)
                final = write_job(out, job, result, info)
            except OSError as e:  # a full or read-only disk: write_job left nothing of the job
                errors.append(JobError(job.spec.line, None, f"cannot write {out / job.spec.name}: "
                                                            f"{e.strerror or _one_line(e)}; nothing of it was kept"))
            except Exception as e:  # noqa: BLE001  a bug: the traceback goes to the log
                errors.append(log.job_error(job.spec, e, "writing it"))
            else:
                print(f"process {info['process']}: wrote {final}")
    progress.close()
    return errors


if __name__ == "__main__":
    sys.exit(main())
