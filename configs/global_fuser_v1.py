"""The packaged stage config cnc_jax/configs/global_fuser_v1.py (`--config global_fuser_v1` names it from any folder)."""

from cnc_jax.configs.global_fuser_v1 import get_config  # noqa: F401
