"""The command-line front ends, each `main(argv=None) -> int`: the console scripts of the installed package
(pyproject.toml [project.scripts]) and the repository's top-level scripts, which only call them.

  cnc-sample    sample.py                  cnc_jax.cli.sample
  cnc-train     train.py                   cnc_jax.cli.train
  cnc-convert   convert_torch_weights.py   cnc_jax.cli.convert
  cnc-evaluate  evaluate.py                cnc_jax.cli.evaluate
  cnc-demo      demo.py                    cnc_jax.cli.demo      (the `demo` extra: gradio)
  cnc-prepare   python -m cnc_jax.cli.prepare
  cnc-annotate  python -m cnc_jax.cli.annotate

host_memory is the training command's first import: it sets the host allocator before numpy and jax start threads.
"""
