"""Both towers of a transformers `CLIPModel` with their projections (CLIPScore's image / text features).

The vision tower is cnc_jax.models.clip_vision's; the text tower is cnc_jax.models.clip_text's transformer,
pooled at the end-of-text token as HF's get_text_features, then `text_projection` (no bias). Module names
follow cnc_jax.checkpoint.names (official `text_model.encoder.layers.1.mlp.fc2` is our
`text_model/layers_1/mlp/fc2`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from cnc_jax.model_config import ConfigError, TextEncoderConfig
from cnc_jax.models import params as module_params
from cnc_jax.models.clip_text import CLIPTextTransformer, pooled_output
from cnc_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from cnc_jax.models.layers import Dense

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIPModel: the two tower configs and the shared projection size (vision.projection_dim equals it)."""

    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    projection_dim: int = 768

    def __post_init__(self):
        if self.vision.projection_dim != self.projection_dim:
            raise ConfigError(f"vision projection_dim {self.vision.projection_dim} != {self.projection_dim}")

    @classmethod
    def from_hf_dict(cls, d: Mapping, source: str = "CLIP config") -> "CLIPConfig":
        """From a whole CLIPModel config.json (model_type 'clip', text_config + vision_config)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("text_config"), Mapping):
            raise ConfigError(f"{source}: not a CLIPModel config (no text_config)")
        vision = CLIPVisionConfig.from_hf_dict(d, source)
        try:
            text = TextEncoderConfig.from_hf_dict(d, source)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(vision=vision, text=text, projection_dim=vision.projection_dim)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPConfig":
        """From dataclasses.asdict(config) (our converted folders)."""
        try:
            return cls(vision=CLIPVisionConfig(**d["vision"]), text=TextEncoderConfig(**d["text"]),
                       projection_dim=d["projection_dim"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a CLIPConfig ({e})") from None


class CLIPTextModelWithProjection(nn.Module):
    """input_ids (B, L) -> text_embeds (B, projection_dim), not normalised (HF get_text_features)."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        text = self.config.text
        hidden = CLIPTextTransformer(text, dtype=self.dtype, name="text_model")(input_ids)
        pooled = pooled_output(hidden, input_ids, text.eos_token_id)
        return Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)


def text_init_inputs(config: CLIPConfig, batch: int = 1) -> dict:
    return {"input_ids": jnp.zeros((batch, config.text.max_position_embeddings), jnp.int32)}


def vision_init_inputs(config: CLIPConfig, batch: int = 1) -> dict:
    v = config.vision
    return {"pixel_values": jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)}


def abstract_params(config: CLIPConfig, *, boxed: bool = False) -> dict:
    """{'clip_vision': ..., 'clip_text': ...} shapes (the two parts of a converted 'clip' folder)."""
    return {"clip_vision": module_params.trace(CLIPVisionModelWithProjection(config.vision),
                                                         vision_init_inputs(config), boxed=boxed),
            "clip_text": module_params.trace(CLIPTextModelWithProjection(config),
                                                       text_init_inputs(config), boxed=boxed)}


def init_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Random numpy parameters of both towers, for smoke runs."""
    return {"clip_vision": module_params.init(CLIPVisionModelWithProjection(config.vision),
                                                     vision_init_inputs(config), seed),
            "clip_text": module_params.init(CLIPTextModelWithProjection(config), text_init_inputs(config),
                                                   seed + 1)}


__all__ = ["CLIPConfig", "CLIPTextModelWithProjection", "abstract_params", "init_params"]
