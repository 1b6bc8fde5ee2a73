"""Stage config: local_fuser_v1 (mode 'local'), the official configs/local_fuser_v1.yaml recipe.

Use as `train.py --config configs/local_fuser_v1.py`; elsewhere the model is the preset `local_fuser_v1`.
"""

from configs.common import stage_config


def get_config():
    return stage_config("local_fuser_v1")
