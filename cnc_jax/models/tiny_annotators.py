"""Tiny configs of the annotator models, for random-weight smoke runs (sample.py --random-init, the data
tools' tiny-models) next to the 'tiny' CnC preset: sized so their outputs fit that preset (32-dim embeddings)."""

from __future__ import annotations

from cnc_jax.model_config import tiny
from cnc_jax.models import clip_vision, dpt, u2net


def tiny_annotator_configs() -> dict:
    """{'clip_vision': ..., 'dpt': ..., 'u2net': ...} configs."""
    dim = tiny().global_fuser.in_dim
    return {
        "clip_vision": clip_vision.CLIPVisionConfig(hidden_size=dim, intermediate_size=2 * dim, projection_dim=dim,
                                                    num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                                    patch_size=8),
        "dpt": dpt.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=64, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=(8, 16, 32, 32),
                             fusion_hidden_size=16),
        "u2net": u2net.U2NetConfig("u2netp"),
    }


def tiny_annotator_params(seed: int = 0) -> dict:
    """Fresh random parameters for each tiny annotator config."""
    modules = {"clip_vision": clip_vision, "dpt": dpt, "u2net": u2net}
    return {kind: modules[kind].init_params(cfg, seed + i) for i, (kind, cfg) in enumerate(tiny_annotator_configs().items())}
