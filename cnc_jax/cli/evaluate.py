"""Evaluate generated images with the paper's metrics: FID, Inception Score, CLIPScore, LPIPS, SSIM, depth error.

  python evaluate.py --generated samples/val --reference data/coco:val2017 --out eval.json \\
                     --inception ckpt/fid_inception --lpips ckpt/lpips_alex --clip ckpt/clip --tokenizer tok/ \\
                     --dpt ckpt/dpt
  python evaluate.py --generated samples/val --reference stats/coco_val.npz --metrics fid,is ...
  python evaluate.py --generated samples/smoke --reference data/s:val --random-init --out smoke.json

--generated: a sample.py output folder (captions from each job.json, conditions from the job folder) or any
folder of images. --reference: a folder of images, BASE_DIR:SPLIT (a dataset tree in the official layout:
images, captions, depth maps, masks), or FID statistics (.npz with mu / sigma, pytorch-fid's format).
Paired metrics (LPIPS, SSIM, depth) match a generated image to the reference by key: the job folder's name
(sample.py --from-dataset names jobs by uid) or the file stem. Weights: folders made by
convert_torch_weights.py convert (README "Evaluate"), or --random-init for tiny random networks.
Unreadable images are reported by name, skipped and counted in the JSON. Bad usage: one error line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cnc_jax.io import InputError, write_atomic
from cnc_jax.model_config import ConfigError
from cnc_jax.platform import configure_cpu
from cnc_jax.torchfile.state_dict import CheckpointError

ALL_METRICS = ("fid", "is", "clip", "lpips", "ssim", "depth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
NETWORKS = {"fid": "inception", "is": "inception", "clip": "clip", "depth": "dpt", "lpips": "lpips"}  # metric -> flag


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, help="sample.py output folder, or a folder of images")
    p.add_argument("--reference", help="image folder, BASE_DIR:SPLIT dataset tree, or FID statistics .npz")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)}")
    p.add_argument("--out", required=True, help="JSON file with the metrics, counts, skipped images, weights")
    p.add_argument("--inception", help="converted FID Inception (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--lpips", help="converted LPIPS (AlexNet trunk + lpips heads)")
    p.add_argument("--clip", help="converted CLIPModel, or a transformers CLIPModel folder")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (default: the --clip folder if it holds one)")
    p.add_argument("--dpt", help="converted DPT (depth error), as sample.py --dpt")
    p.add_argument("--random-init", action="store_true", help="tiny random-weight networks (smoke run)")
    p.add_argument("--save-stats", metavar="FILE.npz", help="write the reference's FID statistics (pytorch-fid format)")
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (torch-fidelity: 10)")
    return p


def _metrics(text: str) -> list[str]:
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if unknown or not wanted:
        raise UsageError(f"--metrics: unknown {unknown or text!r} (choose from {','.join(ALL_METRICS)})")
    return wanted


def check_usage(args, wanted, reference, sample_output: bool) -> None:
    """Every combination that cannot work is refused before anything heavy runs."""
    for metric in wanted:
        flag = NETWORKS.get(metric)
        if flag and not args.random_init and not getattr(args, flag):
            raise UsageError(f"--metrics {metric} needs --{flag} (converted weights, see README 'Evaluate') "
                             "or --random-init")
    kind = reference.kind if reference is not None else None
    if "fid" in wanted and reference is None:
        raise UsageError("--metrics fid needs --reference (images, BASE_DIR:SPLIT or statistics .npz)")
    for metric in ("lpips", "ssim"):
        if metric in wanted and kind not in ("images", "dataset"):
            raise UsageError(f"--metrics {metric} compares image pairs: --reference must be an image folder or "
                             "BASE_DIR:SPLIT")
    if "clip" in wanted and not sample_output and kind != "dataset":
        raise UsageError("--metrics clip needs captions: a sample.py output folder (job.json) or a BASE_DIR:SPLIT "
                         "reference")
    if "depth" in wanted and not sample_output and kind != "dataset":
        raise UsageError("--metrics depth needs the conditions: a sample.py output folder or a BASE_DIR:SPLIT "
                         "reference")
    if args.save_stats and ("fid" not in wanted or kind == "stats"):
        raise UsageError("--save-stats writes the reference's FID statistics: it needs --metrics fid and a "
                         "reference of images")
    if args.per_device_batch < 1 or args.is_splits < 1:
        raise UsageError("--per-device-batch and --is-splits must be positive")


def _tokenizer_folder(args) -> str:
    folder = args.tokenizer or args.clip
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"--metrics clip needs the CLIP tokenizer: --tokenizer FOLDER ({folder} holds no "
                         f"{' / '.join(TOKENIZER_FILES)})")
    return folder


def _describe(path: str) -> dict:
    """The weights a network came from: the folder, and for a converted one the file it was converted from."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import StoreError, read_info

    try:
        source = read_info(path).get("source")
    except StoreError:
        source = None
    return {"path": os.path.abspath(path), "converted_from": source}


def load_nets(args, wanted):
    """EvalNets with the networks the metrics need."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.eval.nets import EvalNets, random_nets

    if args.random_init:
        return random_nets(sorted({NETWORKS[m] for m in wanted if m in NETWORKS}))
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import load_annotator, load_eval_net
    from cnc_jax.text_encoder import load_tokenizer

    nets = EvalNets()
    if {"fid", "is"} & set(wanted):
        config, params = load_eval_net(args.inception, "fid_inception")
        nets.inception, nets.weights["inception"] = (config, params["fid_inception"]), _describe(args.inception)
    if "lpips" in wanted:
        config, params = load_eval_net(args.lpips, "lpips")
        nets.lpips, nets.weights["lpips"] = (config, params["lpips"]), _describe(args.lpips)
    if "clip" in wanted:
        tokenizer_dir = _tokenizer_folder(args)
        nets.clip, nets.weights["clip"] = load_eval_net(args.clip, "clip"), _describe(args.clip)
        nets.tokenizer = load_tokenizer(tokenizer_dir)
    if "depth" in wanted:
        nets.dpt, nets.weights["dpt"] = load_annotator(args.dpt, "dpt"), _describe(args.dpt)
    return nets


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    configure_cpu()
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import ConversionError, StoreError
    from cnc_jax.eval.inputs import generated_items, parse_reference, save_stats

    try:
        wanted = _metrics(args.metrics)
        generated, sample_output = generated_items(args.generated)
        if not generated:
            raise UsageError(f"--generated {args.generated}: no images found")
        reference = parse_reference(args.reference) if args.reference else None
        check_usage(args, wanted, reference, sample_output)
        nets = load_nets(args, wanted)
    except (UsageError, InputError, StoreError, CheckpointError, ConversionError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.eval.run import Options, evaluate

    total = len(generated) + (len(reference.items) if reference is not None and "fid" in wanted else 0)
    bar = tqdm(total=total, unit="img", desc="evaluating")
    saver = (lambda mu, sigma, n: save_stats(args.save_stats, mu, sigma, n)) if args.save_stats else None
    result = evaluate(generated, reference, nets, Options(metrics=wanted, per_device_batch=args.per_device_batch,
                                                          is_splits=args.is_splits),
                      progress=bar.update, save_stats=saver)
    bar.close()
    record = {"generated": os.path.abspath(args.generated), "reference": args.reference, **result,
              "weights": nets.weights}
    if args.save_stats:
        record["saved_stats"] = os.path.abspath(args.save_stats)
    write_atomic(args.out, (json.dumps(record, indent=1) + "\n").encode())
    for entry in result["skipped"]:
        print(f"skipped {entry['name']}{' (' + entry['metric'] + ')' if entry['metric'] else ''}: {entry['error']}",
              file=sys.stderr)
    print(json.dumps(result["metrics"]))
    print(f"wrote {args.out}: {result['num_generated_used']} of {result['num_generated']} generated images used, "
          f"{result['num_skipped_images']} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
