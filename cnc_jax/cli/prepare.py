"""Dataset preparation: the official data/*.py scripts as one resumable, batched command.

  python -m cnc_jax.cli.prepare pickapic         --base-dir D --split S --parquet-dir PARQUETS
  python -m cnc_jax.cli.prepare captions         --base-dir D --split S --coco-json captions_S.json
  python -m cnc_jax.cli.prepare masks-cocostuff  --base-dir D --split S [--annotations DIR]
  python -m cnc_jax.cli.prepare masks-saliency   --base-dir D --split S --u2net W
  python -m cnc_jax.cli.prepare foreground       --base-dir D --split S
  python -m cnc_jax.cli.prepare background       --base-dir D --split S --inpaint CKPT --tokenizer TOK
  python -m cnc_jax.cli.prepare primitives       --base-dir D --split S --clip-vision W --dpt W
  python -m cnc_jax.cli.prepare tfds             --source D:S [--source D2:S2 ...] --data-dir OUT
                                                  [--cached --sd CKPT --tokenizer TOK]
  python -m cnc_jax.cli.prepare synthetic        --base-dir D --split S --count N [--layout full|coco|pickapic]
  python -m cnc_jax.cli.prepare inpainting-config > sd_inpaint.json
  python -m cnc_jax.cli.prepare tiny-models      --out DIR      (random-weight models to try every step)

Every per-image step reads the uids of {split}_captions.txt, skips those whose outputs all exist (so an
interrupted run resumes), writes each file atomically (temp file + rename), runs its models on batches of
--batch-size images split over all local devices, and reports unreadable inputs by file while the others go
on (exit status 1 if any failed, 2 if the step could not start; 1 with one error line naming the file when the
disk refuses a write: full, read-only). --shard I/N takes every N-th uid from the
I-th (one process per host); with --distributed (cnc_jax/distributed.py) the processes join one JAX runtime and
--shard defaults to this process's index / the process count. Sizes follow the official scripts: images, masks,
foregrounds and backgrounds are Resize(R, bicubic) + CenterCrop(R) (R = --resolution, 512), so the outputs are R x R.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from cnc_jax import distributed
from cnc_jax.data.layout import SourceSpec
from cnc_jax.model_config import ConfigError, tiny
from cnc_jax.sampling.sampler_names import DEFAULT_BACKGROUND_SAMPLER, SAMPLER_NAMES
from cnc_jax.torchfile.state_dict import CheckpointError

OFFICIAL_RESOLUTION = 512  # the official data scripts' side

# ---------------------------------------------------------------------------------------------- CLI


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _source(text: str) -> SourceSpec:
    base_dir, sep, split = text.rpartition(":")
    if not sep or not base_dir or not split:
        raise argparse.ArgumentTypeError(f"--source must look like BASE_DIR:SPLIT, got {text!r}")
    return SourceSpec(base_dir, split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_jax.cli.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)

    def tree_step(name, help_text):
        p = steps.add_parser(name, help=help_text)
        p.add_argument("--base-dir", required=True, help="folder holding {split}/ and {split}_captions.txt")
        p.add_argument("--split", required=True, help="e.g. train2017, val, train")
        return p

    def batched(p):
        p.add_argument("--resolution", type=int, default=None,
                       help=f"output side R (default: the side of the maps the tree already holds, e.g. the "
                            f"synthetic scenes' --resolution; else the official {OFFICIAL_RESOLUTION})")
        p.add_argument("--batch-size", type=int, default=8, help="images per batch (all devices together)")
        p.add_argument("--shard", type=_shard, default=None,
                       help="I/N: this process takes uids I, I+N, ... (default 0/1; with --distributed the "
                            "process's index / count)")
        distributed.add_arguments(p)
        return p

    p = tree_step("pickapic", "Pick-a-Pic parquet files -> {split}/uid.jpg and {split}_captions.txt")
    p.add_argument("--parquet-dir", required=True, help="folder of Pick-a-Pic .parquet files (e.g. its val split)")
    p.add_argument("--resolution", type=int, default=512, help="output side R (official 512)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: this process writes selected rows I, I+N, ...")
    p = tree_step("captions", "COCO captions JSON -> {split}_captions.txt")
    p.add_argument("--coco-json", required=True, help="e.g. annotations/captions_train2017.json")
    p.add_argument("--force", action="store_true", help="rewrite an existing captions file")
    p = batched(tree_step("masks-cocostuff", "thing masks from the COCO-Stuff label maps"))
    p.add_argument("--annotations", help="label maps folder (default: dirname(base_dir)/annotations/{split})")
    p = batched(tree_step("masks-saliency", "U2-Net saliency masks"))
    p.add_argument("--u2net", required=True, help="u2net.pth or a converted folder")
    batched(tree_step("foreground", "image x mask"))
    p = batched(tree_step("background", "dilated mask inpainted with SD-inpainting"))
    p.add_argument("--inpaint", required=True, help="converted SD-inpainting checkpoint (see inpainting-config)")
    p.add_argument("--tokenizer", required=True, help="folder with the CLIP tokenizer files")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=DEFAULT_BACKGROUND_SAMPLER,
                   help="diffusers-exact sampler (default pndm: the official get_background.py's PNDM/PLMS)")
    p.add_argument("--guidance", type=float, default=10.0)
    p.add_argument("--dilation", type=int, default=50, help="side of the square dilating the mask (official 50)")
    p.add_argument("--seed", type=int, default=0)
    p = batched(tree_step("primitives", "depth maps and CLIP image embeddings"))
    p.add_argument("--clip-vision", required=True, help="CLIP vision weights (converted or transformers folder)")
    p.add_argument("--dpt", required=True, help="DPT weights (converted, transformers folder or MiDaS .pt)")
    p = steps.add_parser("tfds", help="pack file trees into a cnc_triplets TFDS ArrayRecord dataset")
    p.add_argument("--source", type=_source, action="append", required=True, help="BASE_DIR:SPLIT (repeatable)")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
    p.add_argument("--split-name", default="train", help="name of the TFDS split holding all sources")
    p.add_argument("--resolution", type=int, default=512, help="decode check (and cached latents) resolution")
    p.add_argument("--cached", action="store_true", help="also store VAE latent moments and text embeddings")
    p.add_argument("--sd", help="converted SD / CnC checkpoint whose VAE and text encoder --cached uses")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (--cached)")
    p.add_argument("--batch-size", type=int, default=8)
    # defaults fit the tiny model (configs/tiny.py, sample.py --random-init); official sizes: 512 and 768
    p = tree_step("synthetic", "write random shape scenes in the official layout (defaults fit configs/tiny.py)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--layout", choices=("full", "coco", "pickapic"), default="full")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--image-size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--emb-dim", type=int, default=tiny().global_fuser.in_dim,
                   help="CLIP embedding width (default: the tiny model's; 768 for CLIP ViT-L/14)")
    p.add_argument("--seed", type=int, default=0)
    steps.add_parser("inpainting-config", help="print the model config JSON of SD-1.5 inpainting")
    p = steps.add_parser("tiny-models", help="write tiny random-weight models for trying every step")
    p.add_argument("--out", required=True)
    return parser


def make_step(args):
    """The Step of a per-image command, with its models loaded and split over the local devices."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.data_parallel import DataParallel
    from cnc_jax.prep.steps import (background_step, cocostuff_mask_step, foreground_step, primitives_step,
                                    saliency_mask_step)

    parallel = DataParallel()
    size, batch = args.resolution, parallel.padded_size(args.batch_size)
    if args.step == "masks-cocostuff":
        annotations = args.annotations or os.path.join(os.path.dirname(os.path.abspath(args.base_dir)),
                                                       "annotations", args.split)
        return cocostuff_mask_step(annotations, size)
    if args.step == "foreground":
        return foreground_step(size)
    if args.step == "masks-saliency":
        # start-up time: jax and the models load when the command runs (not for --help or a flag error)
        from cnc_jax.annotators.saliency import SaliencyMasker

        masker = SaliencyMasker.from_checkpoint(args.u2net, size=size)
        masker.params = parallel.replicate(masker.params)
        return saliency_mask_step(masker, parallel, size, batch)
    if args.step == "background":
        # start-up time: jax and the models load when the command runs (not for --help or a flag error)
        from cnc_jax.prep.inpaint import Inpainter
        from cnc_jax.text_encoder import load_tokenizer

        inpainter = Inpainter.from_checkpoint(args.inpaint, load_tokenizer(args.tokenizer), steps=args.steps,
                                              guidance=args.guidance, sampler=args.sampler, parallel=parallel)
        return background_step(inpainter, size, batch, args.seed, args.dilation)
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator

    embedder, estimator = CLIPImageEmbedder.from_pretrained(args.clip_vision), DepthEstimator.from_pretrained(args.dpt)
    embedder.params, estimator.params = parallel.replicate(embedder.params), parallel.replicate(estimator.params)
    return primitives_step(embedder, estimator, parallel, size, batch)


def _run_tfds(args) -> int:
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.data.tfds import build_tfds
    from cnc_jax.prep.cache_encoders import CacheEncoders

    encoders = None
    if args.cached:
        if not (args.sd and args.tokenizer):
            raise ValueError("--cached needs --sd (a converted checkpoint with VAE and text encoder) and --tokenizer")
        # start-up time: jax and the models load when the command runs (not for --help or a flag error)
        from cnc_jax.text_encoder import load_tokenizer

        encoders = CacheEncoders.from_checkpoint(args.sd, load_tokenizer(args.tokenizer), args.batch_size)
    print(build_tfds(args.data_dir, {args.split_name: args.source}, resolution=args.resolution, encoders=encoders))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import ConversionError, StoreError
    from cnc_jax.checkpoint.library_errors import os_error_line
    from cnc_jax.prep.steps import coco_captions, dataset_resolution, run_step

    try:
        if args.step == "inpainting-config":
            # start-up time: jax and the models load when the command runs (not for --help or a flag error)
            from cnc_jax.prep.inpaint import inpainting_config

            print(inpainting_config().to_json())
            return 0
        if args.step == "tiny-models":
            # start-up time: jax and the models load when the command runs (not for --help or a flag error)
            from cnc_jax.prep.tiny_models import write_tiny_models

            for name, path in write_tiny_models(args.out).items():
                print(f"{name}: {path}")
            return 0
        if args.step == "tfds":
            return _run_tfds(args)
        spec = SourceSpec(args.base_dir, args.split)
        if args.step == "synthetic":
            # start-up time: jax and the models load when the command runs (not for --help or a flag error)
            from cnc_jax.prep.synthetic import write_synthetic

            uids = write_synthetic(args.base_dir, args.split, args.count, layout=args.layout,
                                   image_size=args.image_size, resolution=args.resolution,
                                   emb_dim=args.emb_dim, seed=args.seed)
            print(f"wrote {len(uids)} {args.layout} scenes into {spec}")
            return 0
        if args.step == "pickapic":
            # start-up time: jax and the models load when the command runs (not for --help or a flag error)
            from cnc_jax.prep.pickapic import parse_pickapic, summary

            report = parse_pickapic(args.parquet_dir, spec, resolution=args.resolution, shard=args.shard)
            print(summary(report, spec))
            return 1 if report.failed else 0
        if args.step == "captions":
            if os.path.exists(spec.captions_file) and not args.force:
                print(f"{spec.captions_file} exists: nothing to do (--force rewrites it)")
                return 0
            print(f"wrote {coco_captions(args.coco_json, spec)} captions to {spec.captions_file}")
            return 0
        distributed.from_args(args)
        shard = args.shard or distributed.process_shard()
        if args.resolution is None:
            found = dataset_resolution(spec)
            args.resolution = found or OFFICIAL_RESOLUTION
            print(f"resolution {args.resolution}: " + (f"the side of the maps in {spec}" if found else
                  f"the official one ({spec} holds no maps yet; --resolution to choose)"))
        report = run_step(make_step(args), spec, batch_size=args.batch_size, shard=shard)
    except OSError as e:  # a full or read-only disk: exit 1, naming the file (a killed run's partials go next time)
        code, line = os_error_line(e, getattr(args, "out", None) or getattr(args, "data_dir", None)
                                    or getattr(args, "base_dir", ""))
        print(f"error: {line}", file=sys.stderr)
        return code
    except (ValueError, CheckpointError, ConversionError, ConfigError,
            StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.step} {spec}: {report.total} uids, {report.already_done} already done, "
          f"{report.written} written, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
