"""Tiny random-weight stand-ins for every model the dataset tools load, written as converted checkpoints,
so `prepare` runs end to end (tests, demos) without downloading anything:

  python -m cnc_jax.cli.prepare tiny-models --out tiny_models
  -> tiny_models/{u2net, clip_vision, dpt, sd_inpaint, tokenizer}: pass them as --u2net, --clip-vision, --dpt,
     --inpaint / --sd and --tokenizer.

Sizes: U2NETP; CLIP vision width 32 on 32² inputs; a 4-layer DPT; the 'tiny' CnC preset's UNet (9 input
channels), VAE (factor 8) and text encoder, with the byte-level tokenizer (no merges) that fits its 514 ids.
"""

from __future__ import annotations

import dataclasses
import os

from cnc_jax.checkpoint import save_converted
from cnc_jax.io import atomic_path
from cnc_jax.model_config import tiny
from cnc_jax.models.build import init_params
from cnc_jax.models.tiny_annotators import tiny_annotator_configs, tiny_annotator_params
from cnc_jax.prep.inpaint import inpainting_config
from cnc_jax.text_encoder import byte_level_tokenizer


def tiny_inpainting_config():
    return inpainting_config(dataclasses.replace(tiny(), mode="sd", local_fuser=None, global_fuser=None))


def write_tiny_models(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the tiny checkpoints and tokenizer into out_dir; returns {name: folder}. Existing ones are kept (each
    is written atomically, so an existing one is complete)."""
    annotators = tiny_annotator_configs()
    paths = {name: os.path.join(out_dir, name) for name in (*annotators, "sd_inpaint", "tokenizer")}
    missing = [kind for kind in annotators if not os.path.exists(paths[kind])]
    if missing:
        params = tiny_annotator_params(seed)
        for kind in missing:
            save_converted(paths[kind], annotators[kind], {kind: params[kind]}, kind=kind)
    if not os.path.exists(paths["sd_inpaint"]):
        config = tiny_inpainting_config()
        save_converted(paths["sd_inpaint"], config, init_params(config, seed))
    if not os.path.exists(paths["tokenizer"]):  # whole or not at all: an existing folder is kept
        with atomic_path(paths["tokenizer"]) as tmp:
            byte_level_tokenizer().save_pretrained(os.fspath(tmp))
    return paths
