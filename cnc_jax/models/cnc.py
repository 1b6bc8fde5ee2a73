"""The CnC diffusion model: one entry point for the modes local / global / cnc (and plain SD).

Param tree: {'unet': ..., 'local_fuser': ... (local, cnc), 'global_fuser': ... (global, cnc)}.
All image-like inputs are NHWC: latents (B, h, w, 4); depth maps (B, 8h, 8w, 3) in [0, 1];
mask (B, 8h, 8w, 1), any non-zero = foreground.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import CnCConfig
from cnc_jax.models.global_fuser import GlobalFuser
from cnc_jax.models.local_fuser import LocalFuser
from cnc_jax.models.unet import UNet

Dtype = Any


def scale_global_tokens(tokens: jax.Array, global_strength) -> jax.Array:
    """fg tokens (first half) * strength[0], bg tokens * strength[1]; strength (2,) or per sample (B, 2)."""
    k = tokens.shape[1] // 2
    s = jnp.broadcast_to(jnp.asarray(global_strength, tokens.dtype).reshape(-1, 2), (tokens.shape[0], 2))
    scale = jnp.concatenate([jnp.repeat(s[:, :1], k, 1), jnp.repeat(s[:, 1:], k, 1)], axis=1)
    return tokens * scale[:, :, None]


class CnC(nn.Module):
    """eps = CnC(x_noisy, t, text_context, fg_depth, bg_depth, fg_emb, bg_emb, mask, global_strength).

    Inputs a mode does not use may be None (and are ignored if given: mode local never sees a
    mask or embeddings, mode global never sees depth maps).
    """

    config: CnCConfig
    dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)
    remat: bool = False  # rematerialise the trainable blocks (decoder half of the UNet, local fuser)
    attention: str = "xla"  # self-attention implementation: xla | dot_product | chunked | splash

    def setup(self):
        cfg = self.config
        k = cfg.global_fuser.num_tokens if cfg.has_global else 0
        self.unet = UNet(cfg.unet, num_global_tokens=k, dtype=self.dtype, remat=self.remat, attention=self.attention)
        if cfg.has_local:
            self.local_fuser = LocalFuser(cfg.local_fuser, num_global_tokens=k, dtype=self.dtype, remat=self.remat,
                                          attention=self.attention)
        if cfg.has_global:
            self.global_fuser = GlobalFuser(cfg.global_fuser, dtype=self.dtype)

    def _require(self, **inputs):
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(f"mode {self.config.mode!r} needs {', '.join(missing)}")

    def global_tokens(self, fg_emb, bg_emb, deterministic: bool = True):
        """(B, 2k, C) = [fg tokens | bg tokens] before strength scaling."""
        return self.global_fuser(fg_emb, bg_emb, deterministic)

    def context(self, text_context, fg_emb=None, bg_emb=None, global_strength=(1.0, 1.0),
                deterministic: bool = True):
        """The cross-attention context: text tokens, then (modes global/cnc) the scaled global tokens."""
        if not self.config.has_global:
            return text_context
        self._require(fg_emb=fg_emb, bg_emb=bg_emb)
        tokens = scale_global_tokens(self.global_tokens(fg_emb, bg_emb, deterministic), global_strength)
        return jnp.concatenate([text_context.astype(tokens.dtype), tokens], axis=1)

    def controls(self, x, timesteps, context, fg_depth, bg_depth, mask=None, return_features: bool = False,
                 features=None):
        """The local fuser's 13 residuals (and, on request, its 4 depth features, or given ones)."""
        if features is None:
            self._require(fg_depth=fg_depth, bg_depth=bg_depth)
        mask = mask if self.config.has_global else None
        return self.local_fuser(x, timesteps, context, fg_depth, bg_depth, mask, return_features=return_features,
                                features=features)

    def conditions(self, text_context, fg_depth=None, bg_depth=None, fg_emb=None, bg_emb=None, mask=None,
                   global_strength=(1.0, 1.0), deterministic: bool = True) -> dict:
        """What reads neither x_t nor t, for a sampler to compute once instead of once per step: the context
        (text + scaled global tokens), the mask the mode uses and the local fuser's depth features."""
        cfg = self.config
        if cfg.has_global:
            self._require(mask=mask)
        features = None
        if cfg.has_local:
            self._require(fg_depth=fg_depth, bg_depth=bg_depth)
            features = self.local_fuser(None, None, None, fg_depth, bg_depth, features_only=True)
        return {"context": self.context(text_context, fg_emb, bg_emb, global_strength, deterministic),
                "mask": mask if cfg.has_global else None, "features": features}

    def denoise(self, x, timesteps, conditions: dict, control: Optional[Sequence[jax.Array]] = None):
        """eps of x_t at t given `conditions` (the per-step part of __call__)."""
        context, mask = conditions["context"], conditions["mask"]
        if self.config.has_local and control is None:
            control = self.controls(x, timesteps, context, None, None, mask, features=conditions["features"])
        return self.unet(x, timesteps, context, control=control, mask=mask)

    def __call__(self, x, timesteps, text_context, fg_depth=None, bg_depth=None, fg_emb=None, bg_emb=None,
                 mask=None, global_strength=(1.0, 1.0), deterministic: bool = True,
                 control: Optional[Sequence[jax.Array]] = None):
        """`control` may be passed to reuse precomputed residuals (otherwise computed in modes local/cnc)."""
        cfg = self.config
        context = self.context(text_context, fg_emb, bg_emb, global_strength, deterministic)
        if cfg.has_global:
            self._require(mask=mask)
        else:
            mask = None
        if cfg.has_local and control is None:
            control = self.controls(x, timesteps, context, fg_depth, bg_depth, mask)
        return self.denoise(x, timesteps, {"context": context, "mask": mask}, control)
