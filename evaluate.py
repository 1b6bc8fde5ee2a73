"""Evaluate generated images with the paper's metrics: FID, Inception Score, CLIPScore, LPIPS, SSIM, depth error.

A thin wrapper: the command is cnc_jax/cli/evaluate.py (the installed package's `cnc-evaluate`);
`python evaluate.py --help` lists its options.
"""

from cnc_jax.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
