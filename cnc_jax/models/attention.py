"""Soft-guidance (masked) cross-attention and the SD spatial transformer.

Soft guidance: the context is [text tokens | k foreground tokens | k background tokens]; in every
cross-attention the foreground tokens are visible only to pixels inside the foreground mask and
the background tokens only to pixels outside it. The mask arrives at image resolution and is
resized to each attention map's H x W exactly as the official code does (torch bicubic, a = -0.75,
align_corners=False, no antialias, border-clamped taps), after which ANY non-zero value counts as
foreground. Unlike the official code (side = sqrt(N)) we resize to the map's real H x W, so
non-square images work.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.models.attention_kernels import self_attention, xla_attention
from cnc_jax.models.layers import Conv, Dense, GroupNorm, LayerNorm, gelu_exact
from cnc_jax.models.resize import bicubic_matrix

Dtype = Any


def foreground_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W[, 1]) mask at image resolution -> (B, h*w) bool foreground at an attention map of `size`.

    `.bool()` of torch's bicubic resize is true iff some tap with a non-zero weight reads a non-zero
    pixel (barring exact cancellation, which cannot occur for binary masks and integer factors).
    Counting taps keeps this exact in any matmul precision (TPU bf16 passes included).
    """
    if mask.ndim == 4:
        mask = mask[..., 0]
    support_h = jnp.asarray(bicubic_matrix(mask.shape[1], size[0]) != 0, jnp.float32)
    support_w = jnp.asarray(bicubic_matrix(mask.shape[2], size[1]) != 0, jnp.float32)
    hits = jnp.einsum("oh,bhw,pw->bop", support_h, (mask != 0).astype(jnp.float32), support_w)
    return (hits > 0).reshape(mask.shape[0], size[0] * size[1])


def soft_guidance_allowed(fg: jax.Array, num_keys: int, num_global_tokens: int) -> jax.Array:
    """(B, N) foreground -> (B, N, num_keys) bool: text keys always, fg tokens on fg, bg tokens on bg."""
    b, n = fg.shape
    text = num_keys - 2 * num_global_tokens
    if text < 0:
        raise ValueError(f"soft guidance needs {2 * num_global_tokens} global tokens in the context, got {num_keys} keys")
    fg = fg[:, :, None]
    return jnp.concatenate([
        jnp.ones((b, n, text), bool),
        jnp.broadcast_to(fg, (b, n, num_global_tokens)),
        jnp.broadcast_to(~fg, (b, n, num_global_tokens)),
    ], axis=-1)


class Attention(nn.Module):
    """Multi-head attention of LDM (CrossAttention / MaskedCrossAttention), logits in float32.

    `allowed` (B, N, M) bool hides keys per query; hidden logits become -finfo(float32).max, not -inf.
    """

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    impl: str = "xla"  # self-attention implementation (attention_kernels); cross-attention is always 'xla'

    @nn.compact
    def __call__(self, x, context=None, allowed=None):
        inner = self.heads * self.dim_head
        is_self = context is None
        context = x if is_self else context
        b, n, _ = x.shape
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x).reshape(b, n, self.heads, self.dim_head)
        k = Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        m = context.shape[1]
        k = k.reshape(b, m, self.heads, self.dim_head)
        v = v.reshape(b, m, self.heads, self.dim_head)
        scale = self.dim_head ** -0.5
        if is_self and allowed is None:
            out = self_attention(q, k, v, scale, self.impl)
        else:
            out = xla_attention(q, k, v, scale, allowed)
        return Dense(x.shape[-1], dtype=self.dtype, name="to_out")(out.reshape(b, n, inner))


class FeedForward(nn.Module):
    """LDM FeedForward with GEGLU: proj_in (dim -> 2*inner), x * gelu(gate), dropout, proj_out."""

    dim_out: int
    inner_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h, gate = jnp.split(Dense(2 * self.inner_dim, dtype=self.dtype, name="proj_in")(x), 2, axis=-1)
        h = h * gelu_exact(gate)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return Dense(self.dim_out, dtype=self.dtype, name="proj_out")(h)


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: self-attention (never masked), soft-guidance cross-attention, GEGLU FF."""

    heads: int
    dim_head: int
    num_global_tokens: int = 4
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, context, fg: Optional[jax.Array] = None):
        dim = x.shape[-1]
        attn = functools.partial(Attention, self.heads, self.dim_head, dtype=self.dtype, impl=self.attention)
        x = attn(name="attn1")(LayerNorm(dtype=self.dtype, name="norm1")(x)) + x
        allowed = None if fg is None else soft_guidance_allowed(fg, context.shape[1], self.num_global_tokens)
        x = attn(name="attn2")(LayerNorm(dtype=self.dtype, name="norm2")(x), context, allowed) + x
        ff = FeedForward(dim, 4 * dim, dtype=self.dtype, name="ff")
        return ff(LayerNorm(dtype=self.dtype, name="norm3")(x)) + x


class SpatialTransformer(nn.Module):
    """GlobalSpatialTransformer: GroupNorm(eps 1e-6) -> proj_in -> blocks -> proj_out (zero init) + input."""

    heads: int
    dim_head: int
    depth: int = 1
    use_linear: bool = False
    num_global_tokens: int = 4
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, context, mask: Optional[jax.Array] = None):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head

        def proj(features, name, zero_init=False):
            if self.use_linear:
                return Dense(features, zero_init=zero_init, dtype=self.dtype, name=name)
            return Conv(features, 1, padding=0, zero_init=zero_init, dtype=self.dtype, name=name)

        y = GroupNorm(32, 1e-6, dtype=self.dtype, name="norm")(x)
        y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
        fg = None if mask is None else foreground_mask(mask, (h, w))
        for d in range(self.depth):
            y = TransformerBlock(self.heads, self.dim_head, self.num_global_tokens, dtype=self.dtype,
                                 attention=self.attention, name=f"block_{d}")(y, context, fg)
        y = proj(c, "proj_out", zero_init=True)(y.reshape(b, h, w, inner))
        return y + x
