"""Batch sampling with Compose and Conquer.

  python sample.py --checkpoint ckpt/cnc_v1 --tokenizer tokenizer/ --u2net ckpt/u2net --dpt ckpt/dpt \\
                   --clip-vision ckpt/clip_vision --manifest jobs.jsonl --out samples/
  python sample.py --checkpoint ckpt/cnc_v1 ... --prompt "a robot astronaut" --fg-image fg.jpg --out samples/
  python sample.py --random-init --out samples/smoke          # tiny random model, nothing to download

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

import numpy as np
from etils import epath

from cnc_jax import distributed

CONVERT_HINT = """no --checkpoint given. Convert the official weights first, e.g.
  python convert_torch_weights.py convert trained_weights/cnc_v1.ckpt --out ckpt/cnc_v1
  python convert_torch_weights.py convert annotator/u2net/weights/u2net.pth --out ckpt/u2net
  python convert_torch_weights.py convert <folder of Intel/dpt-large or MiDaS dpt_large_384.pt> --out ckpt/dpt
  python convert_torch_weights.py convert <folder of openai/clip-vit-large-patch14> --out ckpt/clip_vision
then: python sample.py --checkpoint ckpt/cnc_v1 --tokenizer <folder with the CLIP tokenizer files> \\
        --u2net ckpt/u2net --dpt ckpt/dpt --clip-vision ckpt/clip_vision --prompt "..." --out samples
or try the pipeline with random weights: python sample.py --random-init --out samples/smoke"""

JOB_FLAGS = {  # job field (and --flag) -> type
    "prompt": str, "negative_prompt": str, "fg_image": str, "bg_image": str, "fg_emb_image": str,
    "bg_emb_image": str, "fg_depth": str, "bg_depth": str, "mask": str, "fg_emb": str, "bg_emb": str,
    "depth_version": str, "fg_depth_control": float, "bg_depth_control": float, "fg_global_control": float,
    "bg_global_control": float, "num_images": int, "steps": int, "cfg_scale": float, "eta": float, "seed": int,
    "name": str,
}
RANDOM_INIT_DEFAULTS = {"size": 128, "steps": 10}
IMPLEMENTATIONS = ("xla", "dot_product", "chunked", "splash")  # cnc_jax.models.attention_kernels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="converted CnC checkpoint folder (convert_torch_weights.py convert)")
    p.add_argument("--tokenizer", help="folder with the CLIP tokenizer files (vocab.json + merges.txt)")
    p.add_argument("--clip-vision", help="CLIP vision weights, for fg/bg embedding images")
    p.add_argument("--u2net", help="U2-Net weights, for masks from images")
    p.add_argument("--dpt", help="DPT weights, for depth maps from images")
    p.add_argument("--random-init", action="store_true", help="tiny random-weight models (pipeline smoke test)")
    p.add_argument("--manifest", help="JSONL file, one job per line")
    p.add_argument("--out", required=True)
    p.add_argument("--per-device-batch", type=int, default=1, help="images per device per batch")
    p.add_argument("--jobs-per-round", type=int, default=32, help="jobs prepared and sampled together")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--attention", choices=IMPLEMENTATIONS + ("auto",), default="auto",
                   help="self-attention: xla, dot_product (cuDNN flash on GPU), chunked (memory-bounded; fastest on "
                        "CPU), splash (TPU); auto = chunked on CPU, dot_product on GPU, splash on TPU")
    for flag, kind in JOB_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None)
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


def load_models(args):
    """(config, params, text encoder, annotators, description) from flags."""
    from cnc_jax.sampling.pipeline import Annotators
    from cnc_jax.sampling.text import TextEncoder, load_tokenizer

    if args.random_init:
        return random_models()
    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator
    from cnc_jax.annotators.saliency import SaliencyMasker, saliency_mask
    from cnc_jax.checkpoint.store import load_converted

    config, params = load_converted(args.checkpoint)
    if not args.tokenizer:
        raise ValueError("--tokenizer is required with --checkpoint (the CLIP tokenizer of "
                         "openai/clip-vit-large-patch14: a folder with vocab.json and merges.txt)")
    text = TextEncoder(config.text_encoder, params["text_encoder"], load_tokenizer(args.tokenizer))
    u2 = SaliencyMasker.from_checkpoint(args.u2net) if args.u2net else None
    annotators = Annotators(
        embedder=CLIPImageEmbedder.from_pretrained(args.clip_vision) if args.clip_vision else None,
        masker=(lambda images, hw: saliency_mask(u2.params, images, config=u2.config, size=hw)) if u2 else None,
        depth=DepthEstimator.from_pretrained(args.dpt) if args.dpt else None)
    return config, params, text, annotators, os.path.abspath(args.checkpoint)


def random_models():
    """The 'tiny' preset and tiny annotators with random weights, and a byte-level tokenizer."""
    import jax

    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator
    from cnc_jax.annotators.saliency import saliency_mask
    from cnc_jax.config import load_config
    from cnc_jax.models.build import init_params
    from cnc_jax.models.tiny import tiny_annotator_configs, tiny_annotator_params
    from cnc_jax.sampling.pipeline import Annotators
    from cnc_jax.sampling.text import TextEncoder, byte_level_tokenizer

    config = load_config("tiny")
    params = init_params(config, seed=0)
    cfgs, weights = tiny_annotator_configs(), tiny_annotator_params(seed=1)
    u2_params = jax.device_put(weights["u2net"])
    annotators = Annotators(
        embedder=CLIPImageEmbedder(cfgs["clip_vision"], weights["clip_vision"]),
        masker=lambda images, hw: saliency_mask(u2_params, images, config=cfgs["u2net"], size=hw),
        depth=DepthEstimator(cfgs["dpt"], weights["dpt"]))
    text = TextEncoder(config.text_encoder, params["text_encoder"], byte_level_tokenizer())
    return config, params, text, annotators, "random-init (tiny preset)"


def _write_job(out_dir: epath.Path, job, images: np.ndarray, info: dict) -> None:
    """All files of a job into a temp folder, then one rename: a job folder is always complete."""
    from cnc_jax.io import to_uint8, write_png

    final = out_dir / job.spec.name
    tmp = out_dir / f".partial-{job.spec.name}-{os.getpid()}"
    tmp.mkdir()
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
            tmp.rmtree()
    print(f"process {info['process']}: wrote {final}")


def _is_done(out_dir: epath.Path, spec) -> bool:
    path = out_dir / spec.name / "job.json"
    return path.is_file() and json.loads(path.read_text()).get("settings") == spec.settings()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from cnc_jax.platform import configure_cpu

    configure_cpu()
    from cnc_jax.sampling.jobs import JobError, parse_job, read_manifest

    try:
        distributed.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not args.checkpoint and not args.random_init:
        print(f"error: {CONVERT_HINT}", file=sys.stderr)
        return 2
    defaults = _job_defaults(args)
    if args.manifest:
        if not os.path.isfile(args.manifest):
            print(f"error: manifest {args.manifest}: no such file", file=sys.stderr)
            return 2
        jobs, errors = read_manifest(args.manifest, defaults)
    else:
        defaults.setdefault("prompt", "a photo" if args.random_init else None)
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
    failed = run_jobs(args, mine) if mine else []
    for e in sorted(failed, key=lambda e: e.line):
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors or distributed.total(len(failed)) else 0


def run_jobs(args, specs) -> list:
    import jax
    from tqdm import tqdm

    from cnc_jax.checkpoint.convert import ConversionError
    from cnc_jax.checkpoint.state_dict import CheckpointError
    from cnc_jax.checkpoint.store import StoreError
    from cnc_jax.config import ConfigError
    from cnc_jax.sampling.jobs import JobError
    from cnc_jax.sampling.pipeline import Pipeline

    try:
        config, params, text, annotators, source = load_models(args)
    except (StoreError, CheckpointError, ConversionError, ConfigError, ValueError, OSError) as e:
        return [JobError(0, None, f"cannot load the models: {e}")]
    from cnc_jax.models.attention_kernels import resolve

    pipeline = Pipeline(config, params, text, annotators, per_device_batch=args.per_device_batch, dtype=args.dtype,
                        attention=resolve(args.attention))
    errors = []
    progress = tqdm(total=sum(s.num_images for s in specs), unit="img", desc="sampling")
    for start in range(0, len(specs), args.jobs_per_round):
        prepared = []
        for spec in specs[start:start + args.jobs_per_round]:
            try:
                prepared.append(pipeline.prepare(spec))
            except JobError as e:
                errors.append(e)
                progress.update(spec.num_images)
        t0 = time.time()
        images = pipeline.generate(prepared, on_images=progress.update) if prepared else {}
        seconds = time.time() - t0
        for job in prepared:
            info = {"settings": job.spec.settings(), "manifest_line": job.spec.line, "checkpoint": source,
                    "mode": config.mode, "devices": pipeline.mesh.size, "batch_size": pipeline.batch_size,
                    "process": jax.process_index(),
                    "image_seeds": [f"fold_in(PRNGKey({job.spec.seed}), {i})" for i in range(job.spec.num_images)],
                    "round_seconds": round(seconds, 2),
                    "notes": ["global_strength (fg/bg_global_control) is applied at every guidance scale, "
                              "also 1 (the official sampler ignores it there)"]}
            _write_job(epath.Path(args.out), job, images[job.spec.name], info)
    progress.close()
    return errors


if __name__ == "__main__":
    sys.exit(main())
