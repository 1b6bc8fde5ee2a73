"""Batch sampling with Compose and Conquer.

A thin wrapper: the command is cnc_jax/cli/sample.py (the installed package's `cnc-sample`);
`python sample.py --help` lists its options.
"""

from cnc_jax.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
