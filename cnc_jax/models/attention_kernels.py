"""Implementations of softmax(q k^T * scale) v for the spatial self-attentions, selectable by name.

  'xla'          the plain einsum + softmax (float32 logits): the reference, materialises (B, H, N, M)
  'dot_product'  jax.nn.dot_product_attention with implementation='cudnn' (cuDNN flash attention) where jax
                 takes the inputs: GPU, bf16/fp16, head dim a multiple of 8 up to 128 (256 from Hopper, sm 9.0);
                 else its XLA path (jax's own default is XLA everywhere). `dot_product_choice` decides;
                 `traced_choices()` says what each traced attention shape got
  'chunked'      one (batch, head) and `chunk` queries at a time (lax.map), scores checkpointed: at most
                 (chunk, M) logits exist at once, so 768² / 1024² images (9216 / 16384 tokens) fit in memory;
                 also the fastest on CPU (cache-sized 2-D matmuls)
  'splash'       Pallas splash attention for TPU (interpret mode elsewhere, for tests); head_dim is
                 zero-padded to a multiple of 128 on TPU; sequences not divisible by its blocks use 'xla'

q, k, v: (B, N, H, D) / (B, M, H, D); returns (B, N, H, D) in v's dtype. The masked soft-guidance
cross-attention (85 keys) always uses 'xla' with the mask (it is tiny and fuses well).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "dot_product", "chunked", "splash")
AUTO = {"cpu": "chunked", "gpu": "dot_product", "tpu": "splash"}  # what 'auto' picks per backend (on GPU:
#       cuDNN flash attention where dot_product_choice allows it, XLA otherwise)


def resolve(impl: str) -> str:
    """'auto' -> the usual best implementation for the default backend; other names are checked and returned."""
    if impl == "auto":
        return AUTO.get(jax.default_backend(), "xla")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS + ('auto',)}")
    return impl
CHUNK = 512
SPLASH_BLOCK = 512
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_TRACED: dict[tuple, str] = {}  # (N, M, heads, head_dim, dtype) -> the dot_product implementation it was traced with


def dot_product_choice(backend: str, dtype, head_dim: int, compute_capability: Optional[tuple[int, int]] = None) -> str:
    """'cudnn' where jax's cuDNN flash attention accepts inference inputs (check_is_flash_attention: bf16/fp16,
    head dim % 8 == 0 and <= 128, <= 256 from sm 9.0; no sequence-length rule without bias), else 'xla'.
    A pure function, so the rule is testable without a GPU."""
    if backend != "gpu" or jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return "xla"
    head_max = 256 if compute_capability is not None and tuple(compute_capability) >= (9, 0) else 128
    return "cudnn" if head_dim % 8 == 0 and head_dim <= head_max else "xla"


def _compute_capability() -> Optional[tuple[int, int]]:
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return tuple(int(x) for x in str(cc).split(".")[:2]) if cc else None


def dot_product_attention(q, k, v, scale: float):
    """jax.nn.dot_product_attention, cuDNN where dot_product_choice allows it; records the choice."""
    backend = jax.default_backend()
    impl = dot_product_choice(backend, q.dtype, q.shape[-1], _compute_capability() if backend == "gpu" else None)
    _TRACED[(q.shape[1], k.shape[1], q.shape[2], q.shape[3], np.dtype(q.dtype).name)] = impl
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale,
                                        implementation=impl).astype(v.dtype)


def traced_choices() -> dict[str, str]:
    """'NxM h<heads> d<dim> <dtype>' -> 'cudnn' | 'xla' for every dot_product self-attention traced so far."""
    return {f"{n}x{m} h{h} d{d} {dt}": impl for (n, m, h, d, dt), impl in sorted(_TRACED.items())}


def xla_attention(q, k, v, scale: float, allowed: Optional[jax.Array] = None):
    """allowed: (B, N, M) bool; hidden logits become -finfo(float32).max (the official fill), not -inf."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if allowed is not None:
        logits = jnp.where(allowed[:, None], logits, -jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhnm,bmhd->bnhd", probs.astype(v.dtype), v)


def chunked_attention(q, k, v, scale: float, chunk: int = CHUNK):
    """One (batch, head) at a time, `chunk` queries at a time, each chunk's scores checkpointed.

    At most (chunk, M) scores exist at once (memory-bounded for any image size), and each step is a plain
    2-D matmul pair whose working set stays in cache: on a 2-core CPU a 64x64-latent self-attention runs
    ~3x faster than 'xla' (which streams (B, H, N, M) scores through memory several times). The softmax's
    division is applied to the (chunk, dv) output rather than to the (chunk, M) probabilities: one pass less
    over the scores (64² latents x 8 heads of 40, B=2: 331 -> 317 ms).
    """
    b, n, h, d = q.shape
    dv = v.shape[-1]
    chunk = min(chunk, n)
    pad = -n % chunk
    heads = lambda x: x.astype(jnp.float32).swapaxes(1, 2).reshape(b * h, x.shape[1], x.shape[-1])  # noqa: E731
    qh = jnp.pad(heads(q), ((0, 0), (0, pad), (0, 0))).reshape(b * h, -1, chunk, d)

    @jax.checkpoint  # a backward pass recomputes one chunk's scores instead of storing all of them
    def one_chunk(qc, kh, vh):
        scores = (qc * scale) @ kh.T
        # the shift cancels in the ratio, so its gradient is zero: stopping it saves the backward's argmax pass
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        return (weights @ vh) / weights.sum(axis=-1, keepdims=True)

    def one_head(args):
        qc, kh, vh = args
        return jax.lax.map(lambda c: one_chunk(c, kh, vh), qc)

    out = jax.lax.map(one_head, (qh, heads(k), heads(v)))  # (b*h, chunks, chunk, dv)
    out = out.reshape(b, h, -1, dv)[:, :, :n].swapaxes(1, 2)
    return out.astype(v.dtype)


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
        return dot_product_attention(q, k, v, scale)
    if impl == "chunked":
        return chunked_attention(q, k, v, scale)
    if impl == "splash":
        return splash_attention(q, k, v, scale)
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS} (resolve 'auto' first)")
