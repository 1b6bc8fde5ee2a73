"""Shared pieces of the stage configs (ml_collections, big_vision style: configs are Python)."""

import ml_collections


def stage_config(model: str) -> ml_collections.ConfigDict:
    """The official training recipe of one stage (DESIGN.md "Training"), for the model preset `model`."""
    c = ml_collections.ConfigDict()
    c.model = model          # preset name, official model YAML, or a converted checkpoint's config.json
    # official recipe: AdamW with torch defaults, lr 1e-5, 4 images per GPU, frozen SD (sd_locked)
    c.learning_rate = 1e-5
    c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay = 0.9, 0.999, 1e-8, 0.01
    c.per_device_batch_size = 4
    c.sd_locked = True
    # per-sample condition dropout (the mask is never dropped)
    c.drop_caption_prob = 0.1
    c.drop_condition_prob = 0.1
    return c
