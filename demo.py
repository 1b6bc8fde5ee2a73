"""The Compose and Conquer gradio demo (the official src/test/test_cnc.py) on the JAX pipeline.

A thin wrapper: the command is cnc_jax/cli/demo.py (the installed package's `cnc-demo`);
`python demo.py --help` lists its options.
"""

from cnc_jax.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
