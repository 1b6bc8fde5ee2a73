"""Stage config: global_fuser_v1 (mode 'global'), the official configs/global_fuser_v1.yaml recipe.

Use as `train.py --config configs/global_fuser_v1.py`; elsewhere the model is the preset `global_fuser_v1`.
"""

from configs.common import stage_config


def get_config():
    return stage_config("global_fuser_v1")
