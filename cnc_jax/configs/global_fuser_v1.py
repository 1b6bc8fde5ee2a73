"""Stage config: global_fuser_v1 (mode 'global'), the official configs/global_fuser_v1.yaml recipe.

Use as `train.py --config global_fuser_v1` (from any folder) or `--config configs/global_fuser_v1.py` (the
repository's thin file); elsewhere (convert_torch_weights.py, sample.py) the model is the preset `global_fuser_v1`.
"""

from cnc_jax.configs.common import stage_config


def get_config():
    return stage_config("global_fuser_v1")
