"""The global fuser: fg / bg CLIP image embeddings -> k foreground + k background context tokens."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnc_jax.model_config import GlobalFuserConfig
from cnc_jax.models.attention import FeedForward
from cnc_jax.models.layers import LayerNorm

Dtype = Any


class GlobalFuser(nn.Module):
    """Per branch: LayerNorm -> FF(GEGLU, dropout1) -> LayerNorm -> FF(GEGLU, dropout2) -> (k, in_dim).

    Output (B, 2k, in_dim) = [fg tokens | bg tokens]. Note the argument order (fg, bg); the
    official forward takes (bg_emb, fg_emb). Dropout is active when deterministic=False (training).
    """

    config: GlobalFuserConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fg_emb, bg_emb, deterministic: bool = True):
        cfg = self.config
        d, (m1, m2) = cfg.in_dim, cfg.channel_mult

        def branch(x, tag):
            x = LayerNorm(dtype=self.dtype, name=f"norm1_{tag}")(x.astype(self.dtype))
            x = FeedForward(d * m1, d * m1 * 2, cfg.dropout1, dtype=self.dtype, name=f"ff1_{tag}")(x, deterministic)
            x = LayerNorm(dtype=self.dtype, name=f"norm2_{tag}")(x)
            inner2 = d * m1 * (m2 * 2 // m1)
            x = FeedForward(d * m2, inner2, cfg.dropout2, dtype=self.dtype, name=f"ff2_{tag}")(x, deterministic)
            return x.reshape(x.shape[0], cfg.num_tokens, d)

        return jnp.concatenate([branch(fg_emb, "fg"), branch(bg_emb, "bg")], axis=1)
