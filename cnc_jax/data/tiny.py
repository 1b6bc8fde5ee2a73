"""Tiny random-weight stand-ins for every model the dataset tools load, written as converted checkpoints,
so `prepare` runs end to end (tests, demos) without downloading anything:

  python -m cnc_jax.data.prepare tiny-models --out /tmp/tiny
  -> /tmp/tiny/{u2net, clip_vision, dpt, sd_inpaint, tokenizer}: pass them as --u2net, --clip-vision, --dpt,
     --inpaint / --sd and --tokenizer.

Sizes: U2NETP; CLIP vision width 32 on 32² inputs; a 4-layer DPT; the 'tiny' CnC preset's UNet (9 input
channels), VAE (factor 8) and text encoder, with the byte-level tokenizer (no merges) that fits its 514 ids.
"""

from __future__ import annotations

import dataclasses
import os

from cnc_jax.config import tiny
from cnc_jax.data.inpaint import inpainting_config


def tiny_inpainting_config():
    return inpainting_config(dataclasses.replace(tiny(), mode="sd", local_fuser=None, global_fuser=None))


def write_tiny_models(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the tiny checkpoints and tokenizer into out_dir; returns {name: folder}. Existing ones are kept."""
    from cnc_jax.checkpoint.store import save_converted
    from cnc_jax.models import clip_vision, dpt, u2net
    from cnc_jax.models.build import init_params
    from cnc_jax.sampling.text import byte_level_tokenizer

    dim = tiny().global_fuser.in_dim
    annotators = {
        "clip_vision": clip_vision.CLIPVisionConfig(hidden_size=dim, intermediate_size=2 * dim, projection_dim=dim,
                                                    num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                                    patch_size=8),
        "dpt": dpt.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=64, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=(8, 16, 32, 32),
                             fusion_hidden_size=16),
        "u2net": u2net.U2NetConfig("u2netp"),
    }
    modules = {"clip_vision": clip_vision, "dpt": dpt, "u2net": u2net}
    paths = {name: os.path.join(out_dir, name) for name in (*annotators, "sd_inpaint", "tokenizer")}
    for i, (kind, config) in enumerate(annotators.items()):
        if not os.path.exists(paths[kind]):
            save_converted(paths[kind], config, {kind: modules[kind].init_params(config, seed + i)}, kind=kind)
    if not os.path.exists(paths["sd_inpaint"]):
        config = tiny_inpainting_config()
        save_converted(paths["sd_inpaint"], config, init_params(config, seed))
    if not os.path.exists(paths["tokenizer"]):
        byte_level_tokenizer().save_pretrained(paths["tokenizer"])
    return paths
