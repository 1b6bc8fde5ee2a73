"""Throughput of the FID Inception features (pool3 + logits) at 299², the cost that dominates FID / IS.

  python bench/eval_bench.py [--batch 8] [--size 512] [--repeats 3] [--weights CONVERTED_FOLDER]

Random weights in the real architecture unless --weights (speed does not depend on the values). Input images
are --size² (resized to 299 inside, as pytorch-fid does); the FLOP count is XLA's cost analysis of one batch.
Prints one JSON line (bench/common.py): images/s, ms per batch, GFLOP per image, achieved TFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import compile_timed, median, model_flops, peak_memory_gb, report, time_calls  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="input side (resized to 299 inside)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", help="converted fid_inception folder (default: random weights)")
    parser.add_argument("--no-onednn", action="store_true", help="CPU: keep XLA's default Eigen kernels")
    args = parser.parse_args()
    from cnc_jax.platform import configure_cpu

    configure_cpu(not args.no_onednn)
    import jax
    import numpy as np

    from cnc_jax.models.inception import FIDInceptionV3, InceptionConfig, init_params

    if args.weights:
        from cnc_jax.checkpoint import load_eval_net

        config, params = load_eval_net(args.weights, "fid_inception")
        params = params["fid_inception"]
    else:
        config = InceptionConfig()
        params = init_params(config)
    model = FIDInceptionV3(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    params = jax.device_put(params)
    images = jax.device_put(np.random.default_rng(0).uniform(size=(args.batch, args.size, args.size, 3))
                            .astype(np.float32))
    flops = model_flops(forward, params, images)
    compiled, compile_s = compile_timed(forward, params, images)
    jax.block_until_ready(compiled(params, images))  # warm-up
    seconds = median(time_calls(compiled, (params, images), args.repeats))
    report({"bench": "eval_inception", "input": f"{args.size}x{args.size} -> {config.input_size}", "batch": args.batch,
            "images_per_s": round(args.batch / seconds, 2), "ms_per_batch": round(seconds * 1e3, 1),
            "gflop_per_image": round(flops / args.batch / 1e9, 3), "achieved_tflops": round(flops / seconds / 1e12, 4),
            "compile_s": round(compile_s, 1), **peak_memory_gb()})


if __name__ == "__main__":
    main()
