"""The packaged stage config cnc_jax/configs/tiny.py (`--config tiny` names it from any folder)."""

from cnc_jax.configs.tiny import get_config  # noqa: F401
