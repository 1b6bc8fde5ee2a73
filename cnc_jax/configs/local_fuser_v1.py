"""Stage config: local_fuser_v1 (mode 'local'), the official configs/local_fuser_v1.yaml recipe.

Use as `train.py --config local_fuser_v1` (from any folder) or `--config configs/local_fuser_v1.py` (the
repository's thin file); elsewhere (convert_torch_weights.py, sample.py) the model is the preset `local_fuser_v1`.
"""

from cnc_jax.configs.common import stage_config


def get_config():
    return stage_config("local_fuser_v1")
