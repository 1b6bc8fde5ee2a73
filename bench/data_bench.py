"""Throughput of the training input pipeline (examples/s) at 512², file tree and TFDS ArrayRecord paths.

  python bench/data_bench.py [--records 96] [--batch-size 8] [--workers 0 2] [--batches 24] [--dir DIR]

Writes a synthetic dataset in the official layout (COCO-like 480x640 jpgs, 512² masks / depth maps, 768-d
.pt embeddings) unless --dir already holds one, packs it into cnc_triplets, then times full batches
(decode, official resize/crop, dropout, tokenisation, float conversion, batching) after warm-up batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(sources, args, workers: int) -> float:
    from cnc_jax.data.pipeline import make_train_iterator
    from cnc_jax.text_encoder import byte_level_tokenizer

    it = make_train_iterator(sources, batch_size=args.batch_size, resolution=args.resolution,
                             tokenizer=byte_level_tokenizer(), num_workers=workers, seed=0)
    for _ in range(1 + 2 * workers):  # warm-up: worker start-up, first reads
        next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    seconds = time.perf_counter() - start
    it.close()
    return args.batches * args.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dir", help="dataset folder (kept); default: a temporary one")
    args = parser.parse_args()

    from cnc_jax.data.layout import SourceSpec, TFDSSpec
    from cnc_jax.data.tfds import build_tfds
    from cnc_jax.prep.synthetic import write_synthetic

    root = args.dir or tempfile.mkdtemp(prefix="cnc_data_bench-")
    tree = SourceSpec(os.path.join(root, "images"), "train")
    if not os.path.exists(tree.captions_file):
        t = time.perf_counter()
        write_synthetic(tree.base_dir, tree.split, args.records, resolution=args.resolution, image_size=(480, 640),
                        emb_dim=768)
        print(f"wrote {args.records} synthetic records in {time.perf_counter() - t:.1f} s")
    build_tfds(os.path.join(root, "tfds"), {"train": [tree]}, resolution=args.resolution)
    print(f"{os.cpu_count()} CPUs, batch {args.batch_size}, {args.resolution}², {args.batches} batches timed")
    for workers in args.workers:
        for name, sources in (("file tree", [tree]), ("tfds", [TFDSSpec(os.path.join(root, "tfds"))])):
            print(f"{name:9s} workers={workers}: {measure(sources, args, workers):7.1f} examples/s", flush=True)


if __name__ == "__main__":
    main()
