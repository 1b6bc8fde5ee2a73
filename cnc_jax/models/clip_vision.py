"""The CLIP vision tower with projection of HF `CLIPVisionModelWithProjection` (CnC's fg_emb / bg_emb source).

The official code (utils/primitives.py GetCLIPImageEmbeddings) feeds CLIPImageProcessor pixels of
openai/clip-vit-large-patch14 to this model and keeps `image_embeds`. Module names follow
`cnc_jax.checkpoint.names.CLIP_VISION_RULES`: official `vision_model.encoder.layers.3.mlp.fc1` is our
`layers_3/mlp/fc1`, `vision_model.embeddings.*` our `embeddings/...`, `visual_projection` stays.
The encoder layers are the text tower's (cnc_jax.models.clip_text) without the causal mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from cnc_jax.model_config import ConfigError
from cnc_jax.models import layers
from cnc_jax.models import params as module_params
from cnc_jax.models.clip_text import ACTIVATIONS, CLIPEncoderLayer
from cnc_jax.models.layers import Dense, Embed, LayerNorm

Dtype = Any

# HF CLIPVisionConfig's own defaults (a ViT-B/32 tower): what transformers assumes for a field a config.json
# leaves out. Our dataclass defaults are openai/clip-vit-large-patch14's instead.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5)
_MODEL_TYPES = ("clip_vision_model", "clip")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """HF `CLIPVisionConfig` fields; defaults = the vision tower of openai/clip-vit-large-patch14."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "hidden_act":
                if value not in ACTIVATIONS:
                    raise ConfigError(f"hidden_act {value!r} is not supported (one of {sorted(ACTIVATIONS)})")
            elif f.name == "layer_norm_eps":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ConfigError(f"layer_norm_eps must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ConfigError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @classmethod
    def from_hf_dict(cls, d: Mapping, source: str = "CLIP vision config") -> "CLIPVisionConfig":
        """From a vision config.json (CLIPVisionModel[WithProjection]) or a whole CLIPModel config.json.

        For a CLIPModel config the tower is `vision_config` and projection_dim the top-level one (the
        visual_projection of a CLIPModel is sized by it). Fields a file leaves out take HF's class
        defaults (HF_DEFAULTS), as transformers would. Raises ConfigError naming `source`.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type not in _MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a CLIP vision tower "
                              f"(expected one of {_MODEL_TYPES})")
        vision = d
        if "vision_config" in d or model_type == "clip":
            vision = d.get("vision_config")
            if not isinstance(vision, Mapping):
                raise ConfigError(f"{source}: a CLIPModel config needs a 'vision_config' object, got {vision!r}")
        elif "text_config" in d:
            raise ConfigError(f"{source}: has a text_config but no vision_config")
        kwargs = {f.name: vision.get(f.name, HF_DEFAULTS[f.name]) for f in dataclasses.fields(cls)}
        if vision is not d:
            kwargs["projection_dim"] = d.get("projection_dim", kwargs["projection_dim"])
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


class CLIPVisionEmbeddings(nn.Module):
    """[class token, patch tokens (row-major)] + learned position embeddings -> (B, 1 + num_patches, hidden)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt = self.config, self.dtype
        patches = layers.Conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, padding=0, use_bias=False,
                              dtype=dt, param_dtype=self.param_dtype, name="patch_embedding")(pixel_values)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        # torch initialises the raw parameter with torch.randn (N(0, 1))
        cls = layers.logical_param(self, "class_embedding", layers.Init("normal", 1.0), (cfg.hidden_size,),
                                   ("embed",), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(dt), (b, 1, cfg.hidden_size))
        h = jnp.concatenate([cls, patches], axis=1)
        return h + Embed(cfg.num_positions, cfg.hidden_size, dtype=dt, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(cfg.num_positions))


class CLIPVisionModelWithProjection(nn.Module):
    """pixel_values NHWC (B, image_size, image_size, num_channels), already normalised ->
    (image_embeds (B, projection_dim), last_hidden_state (B, 1 + num_patches, hidden_size)).

    last_hidden_state is the encoder output (NOT post-layernormed, as HF's); image_embeds =
    visual_projection(post_layernorm(last_hidden_state[:, 0])).
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt = self.config, self.dtype
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIP vision tower expects NHWC pixel_values (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got shape {tuple(pixel_values.shape)}")
        h = CLIPVisionEmbeddings(cfg, dtype=dt, name="embeddings")(pixel_values)
        h = LayerNorm(cfg.layer_norm_eps, dtype=dt, name="pre_layrnorm")(h)  # sic: HF's spelling
        for i in range(cfg.num_hidden_layers):
            h = CLIPEncoderLayer(cfg, dtype=dt, causal=False, name=f"layers_{i}")(h)
        pooled = LayerNorm(cfg.layer_norm_eps, dtype=dt, name="post_layernorm")(h[:, 0])
        image_embeds = Dense(cfg.projection_dim, use_bias=False, dtype=dt, name="visual_projection")(pooled)
        return image_embeds, h


def init_inputs(config: CLIPVisionConfig, batch: int = 1) -> dict:
    """Example keyword arguments for `CLIPVisionModelWithProjection(config).init` (zeros; the image size is fixed)."""
    return {"pixel_values": jnp.zeros((batch, config.image_size, config.image_size, config.num_channels),
                                      jnp.float32)}


def abstract_params(config: CLIPVisionConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters (boxed: nn.Partitioned leaves with logical axis names)."""
    return module_params.trace(CLIPVisionModelWithProjection(config), init_inputs(config), boxed=boxed)


def init_params(config: CLIPVisionConfig, seed: int = 0) -> dict:
    """Fresh numpy parameters (torch default inits), e.g. for random-weight smoke runs."""
    return module_params.init(CLIPVisionModelWithProjection(config), init_inputs(config), seed)


__all__ = ["CLIPVisionConfig", "CLIPVisionModelWithProjection", "CLIPVisionEmbeddings",
           "init_inputs", "abstract_params", "init_params", "HF_DEFAULTS"]
