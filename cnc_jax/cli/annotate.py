"""Annotate image files: depth map (png), saliency mask (png) and CLIP image embedding (npy) per image.

  python -m cnc_jax.cli.annotate IMAGE... --out DIR [--clip-vision W] [--u2net W] [--dpt W] [--size 512]

Each W is a converted folder (convert_torch_weights.py) or an official / transformers source. Images are
sized as the dataset scripts do (shorter side -> size, bicubic, centre crop). Writes DIR/<stem>_depth.png,
DIR/<stem>_mask.png, DIR/<stem>_emb.npy; a bad image is reported by name, the others are still written,
and the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from cnc_jax.annotators.images import dataset_transform, to_unit
from cnc_jax.io import InputError, image_bytes, npy_bytes, read_rgb_image, to_uint8, write_atomic
from cnc_jax.model_config import ConfigError
from cnc_jax.torchfile.state_dict import CheckpointError


def annotate_image(image: np.ndarray, *, embedder=None, masker=None, depth=None, size: int = 512) -> dict:
    """One (H, W, 3) uint8 image -> {'emb': (C,), 'mask': (size, size, 1), 'depth': (size, size, 3)} (those asked)."""
    crop = dataset_transform(image, size)
    batch = to_unit(crop)[None]
    out = {}
    if embedder is not None:
        out["emb"] = np.asarray(embedder([crop]))[0]
    if masker is not None:
        out["mask"] = np.asarray(masker(batch))[0]
    if depth is not None:
        out["depth"] = np.asarray(depth(batch))[0]
    return out


def annotate_files(paths: Sequence[str], out_dir: str, *, embedder=None, masker=None, depth=None,
                   size: int = 512) -> dict[str, str]:
    """Annotate every file; returns {path: error message} for the files that failed."""
    os.makedirs(out_dir, exist_ok=True)
    failures = {}
    for path in tqdm(paths, desc="annotate", unit="img"):
        try:
            result = annotate_image(read_rgb_image(path), embedder=embedder, masker=masker, depth=depth, size=size)
        except InputError as e:
            failures[path] = str(e)
            continue
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        if "emb" in result:
            write_atomic(stem + "_emb.npy", npy_bytes(result["emb"].astype(np.float32)))
        if "mask" in result:
            write_atomic(stem + "_mask.png", image_bytes(to_uint8(result["mask"])))
        if "depth" in result:
            write_atomic(stem + "_depth.png", image_bytes(to_uint8(result["depth"][..., 0])))
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip-vision", help="CLIP vision weights (embeddings)")
    parser.add_argument("--u2net", help="U2-Net weights (masks)")
    parser.add_argument("--dpt", help="DPT weights (depth maps)")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    if not (args.clip_vision or args.u2net or args.dpt):
        parser.error("give at least one of --clip-vision, --u2net, --dpt")

    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator
    from cnc_jax.annotators.saliency import SaliencyMasker
    from cnc_jax.checkpoint import ConversionError, StoreError

    try:
        embedder = CLIPImageEmbedder.from_pretrained(args.clip_vision) if args.clip_vision else None
        masker = SaliencyMasker.from_checkpoint(args.u2net, size=args.size) if args.u2net else None
        depth = DepthEstimator.from_pretrained(args.dpt) if args.dpt else None
    except (CheckpointError, ConversionError, ConfigError, StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failures = annotate_files(args.images, args.out, embedder=embedder, masker=masker, depth=depth, size=args.size)
    for path, message in failures.items():
        print(f"error: {message}", file=sys.stderr)
    print(f"annotated {len(args.images) - len(failures)} of {len(args.images)} images into {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
