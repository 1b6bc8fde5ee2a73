"""Stage config: cnc_v1 (mode 'cnc'), the official configs/cnc_v1.yaml recipe.

Use as `train.py --config configs/cnc_v1.py`; elsewhere the model is the preset `cnc_v1`.
"""

from configs.common import stage_config


def get_config():
    return stage_config("cnc_v1")
