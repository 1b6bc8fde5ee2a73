"""Convert official Compose-and-Conquer / Stable Diffusion PyTorch checkpoints to cnc_jax (orbax).

A thin wrapper: the command is cnc_jax/cli/convert.py (the installed package's `cnc-convert`);
`python convert_torch_weights.py --help` lists its options.
"""

from cnc_jax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
