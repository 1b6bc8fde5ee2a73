"""What trains and what stays frozen in a stage: the parameter tree split by the official recipe.

The official recipe (models/cnc.py configure_optimizers): the mode's adapter(s) train; with
sd_locked=False also the UNet's output blocks and its `out` layers (norm_out, conv_out). Everything else
(UNet input/middle blocks and time embedding, VAE, text encoder) is frozen and never enters the optimizer.
Training splits by it, and so does a run folder's checkpoint reader (its checkpoints hold the trainable part).
"""

from __future__ import annotations

from cnc_jax.model_config import CnCConfig


def is_trainable(config: CnCConfig, part: str, block: str = "", sd_locked: bool = True) -> bool:
    """Whether a part (and, for the UNet, one of its top-level blocks) trains in this stage."""
    if part == "local_fuser":
        return config.has_local
    if part == "global_fuser":
        return config.has_global
    if part == "unet" and not sd_locked:
        return block.startswith("output_") or block in ("norm_out", "conv_out")
    return False


def split_params(config: CnCConfig, params: dict, sd_locked: bool) -> tuple[dict, dict]:
    """{part: tree} -> (trainable, frozen): disjoint {part: tree} dicts (the UNet splits by top-level block)."""
    trainable, frozen = {}, {}
    for part, tree in params.items():
        if part == "unet":
            t = {k: v for k, v in tree.items() if is_trainable(config, part, k, sd_locked)}
            f = {k: v for k, v in tree.items() if k not in t}
        else:
            t, f = (tree, {}) if is_trainable(config, part, sd_locked=sd_locked) else ({}, tree)
        if t:
            trainable[part] = t
        if f:
            frozen[part] = f
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of split_params."""
    return {part: {**frozen.get(part, {}), **trainable.get(part, {})} for part in {**frozen, **trainable}}
