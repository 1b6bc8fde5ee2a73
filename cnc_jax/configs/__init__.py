"""The stage configs (ml_collections, big_vision style: configs are Python), shipped with the package.

`--config NAME` of train.py / cnc-train takes one of NAMES (the file `cnc_jax/configs/NAME.py`); a path
(`--config configs/tiny.py`, the thin files of the repository's top-level configs/ folder, or a config of your
own) is read as it is. Either way `--config.FIELD=VALUE` overrides a field. Not to be confused with
cnc_jax.model_config, the model configs (presets, official YAMLs) a stage config's `model` field names.
"""

from __future__ import annotations

import os

NAMES = ("cnc_v1", "global_fuser_v1", "local_fuser_v1", "tiny")


def config_file(spec: str) -> str:
    """The file of a `--config` value: a packaged config's for a bare name of NAMES (an optional `:ARG` of
    ml_collections' config_flags kept), anything else unchanged."""
    name, sep, arg = spec.partition(":")
    if name in NAMES:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py") + sep + arg
    return spec
