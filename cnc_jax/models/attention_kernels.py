"""Implementations of softmax(q k^T * scale) v for the spatial self-attentions, selectable by name.

  'xla'          the plain einsum + softmax (float32 logits): the reference, materialises (B, H, N, M)
  'dot_product'  jax.nn.dot_product_attention (cuDNN flash attention on GPU for bf16/fp16 inputs)
  'chunked'      queries in chunks inside a lax.map: at most (B, H, chunk, M) logits exist at once, so
                 768² / 1024² images (9216 / 16384 tokens) fit in memory on CPU and GPU
  'splash'       Pallas splash attention for TPU (interpret mode elsewhere, for tests); head_dim is
                 zero-padded to a multiple of 128 on TPU; sequences not divisible by its blocks use 'xla'

q, k, v: (B, N, H, D) / (B, M, H, D); returns (B, N, H, D) in v's dtype. The masked soft-guidance
cross-attention (85 keys) always uses 'xla' with the mask (it is tiny and fuses well).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "dot_product", "chunked", "splash")
CHUNK = 1024
SPLASH_BLOCK = 512


def xla_attention(q, k, v, scale: float, allowed: Optional[jax.Array] = None):
    """allowed: (B, N, M) bool; hidden logits become -finfo(float32).max (the official fill), not -inf."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if allowed is not None:
        logits = jnp.where(allowed[:, None], logits, -jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhnm,bmhd->bnhd", probs.astype(v.dtype), v)


def chunked_attention(q, k, v, scale: float, chunk: int = CHUNK):
    n = q.shape[1]
    if n <= chunk:
        return xla_attention(q, k, v, scale)
    pad = -n % chunk
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qc.reshape(q.shape[0], -1, chunk, *q.shape[2:]).swapaxes(0, 1)  # (chunks, B, chunk, H, D)
    out = jax.lax.map(lambda qi: xla_attention(qi, k, v, scale), qc)
    return out.swapaxes(0, 1).reshape(q.shape[0], -1, *v.shape[2:])[:, :n]


def splash_attention(q, k, v, scale: float):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mk

    b, n, h, d = q.shape
    m = k.shape[1]
    block_q, block_kv = min(SPLASH_BLOCK, n), min(SPLASH_BLOCK, m)
    if n % 128 or m % 128 or n % block_q or m % block_kv:
        return xla_attention(q, k, v, scale)
    on_tpu = jax.default_backend() == "tpu"
    pad = -d % 128 if on_tpu else 0
    mask = mk.MultiHeadMask([mk.FullMask((n, m)) for _ in range(h)])
    kernel = sk.make_splash_mha(mask, block_sizes=sk.BlockSizes(block_q=block_q, block_kv=block_kv,
                                                                block_kv_compute=block_kv),
                                head_shards=1, q_seq_shards=1, interpret=not on_tpu)

    def heads_first(x):  # (B, T, H, D) -> (B, H, T, D + pad)
        return jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, 0), (0, pad)))

    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v))
    return out[..., :d].swapaxes(1, 2).astype(v.dtype)


def self_attention(q, k, v, scale: float, impl: str = "xla"):
    if impl == "xla":
        return xla_attention(q, k, v, scale)
    if impl == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, scale=scale).astype(v.dtype)
    if impl == "chunked":
        return chunked_attention(q, k, v, scale)
    if impl == "splash":
        return splash_attention(q, k, v, scale)
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")
