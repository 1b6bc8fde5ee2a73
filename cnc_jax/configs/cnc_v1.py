"""Stage config: cnc_v1 (mode 'cnc'), the official configs/cnc_v1.yaml recipe.

Use as `train.py --config cnc_v1` (from any folder) or `--config configs/cnc_v1.py` (the
repository's thin file); elsewhere (convert_torch_weights.py, sample.py) the model is the preset `cnc_v1`.
"""

from cnc_jax.configs.common import stage_config


def get_config():
    return stage_config("cnc_v1")
