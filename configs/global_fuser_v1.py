"""Stage config: global_fuser_v1 (mode 'global'), the official configs/global_fuser_v1.yaml recipe.

Use as `--config configs/global_fuser_v1.py` wherever a model config is taken (e.g. convert_torch_weights.py).
"""

from configs.common import stage_config


def get_config():
    return stage_config("global_fuser_v1")
