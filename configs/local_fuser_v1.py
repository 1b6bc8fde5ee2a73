"""The packaged stage config cnc_jax/configs/local_fuser_v1.py (`--config local_fuser_v1` names it from any folder)."""

from cnc_jax.configs.local_fuser_v1 import get_config  # noqa: F401
