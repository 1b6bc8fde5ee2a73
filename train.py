"""Train a CnC stage (local fuser, global fuser, or CnC fine-tuning) on a device mesh.

A thin wrapper: the command is cnc_jax/cli/train.py (the installed package's `cnc-train`);
`python train.py --help` lists its options.
"""

from cnc_jax.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
