"""Tiny random-weight CnC for tests and smoke runs on CPU. Pair it with a synthetic dataset:
  python -m cnc_jax.cli.prepare synthetic --base-dir data/synth --split train --count 32
  python train.py --config configs/tiny.py --workdir runs/tiny --config.data.sources=data/synth:train
  cnc-train --config tiny --workdir runs/tiny --config.data.sources=data/synth:train    (installed package)
"""

from cnc_jax.configs.common import stage_config


def get_config():
    c = stage_config("tiny")
    c.random_init = True
    c.tokenizer = "byte_level"
    c.data.resolution = 64
    c.batch_size = 4
    c.num_steps = 20
    c.remat = False
    c.sd_locked = False  # random weights: the UNet's zero-initialised output conv must train for any signal
    c.log_every = 5
    c.checkpoint_every = 10
    c.image_log_every = 0
    c.image_log_steps = 5
    return c
