"""The shared pieces of the stage configs live in cnc_jax/configs/common.py (for configs of your own)."""

from cnc_jax.configs.common import stage_config  # noqa: F401
