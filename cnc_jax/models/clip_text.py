"""The CLIP text transformer of HF `CLIPTextModel` (SD 1.5's FrozenCLIPEmbedder uses last_hidden_state).

Module names follow `cnc_jax.checkpoint.names` (official `encoder.layers.3.mlp.fc1` is our
`layers_3/mlp/fc1`). Attention is causal only: the official embedder passes no padding mask, so
padding tokens (the end-of-text token for SD's tokenizer) are attended to like any other token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import TextEncoderConfig
from cnc_jax.models.layers import Dense, Embed, LayerNorm, gelu_exact, quick_gelu

Dtype = Any
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}


class CLIPAttention(nn.Module):
    """Multi-head self-attention (projections with biases); logits and softmax in float32.

    Causal for the text tower; the vision tower (cnc_jax.models.clip_vision) sets causal=False.
    """

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, n, d = x.shape
        heads = cfg.num_attention_heads
        head_dim = d // heads

        def proj(name):
            return Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, heads, head_dim)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * (head_dim ** -0.5)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[cfg.hidden_act](h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer (causal attention unless causal=False).

    Reads only num_attention_heads, intermediate_size, hidden_size, hidden_act and layer_norm_eps of `config`,
    so the vision tower passes its CLIPVisionConfig.
    """

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        eps = cfg.layer_norm_eps
        attn = CLIPAttention(cfg, dtype=dt, causal=self.causal, name="self_attn")
        x = x + attn(LayerNorm(eps, dtype=dt, name="layer_norm1")(x))
        return x + CLIPMLP(cfg, dtype=dt, name="mlp")(LayerNorm(eps, dtype=dt, name="layer_norm2")(x))


class CLIPTextTransformer(nn.Module):
    """int token ids (B, L), L <= max_position_embeddings -> last_hidden_state (B, L, hidden_size)."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, dt = self.config, self.dtype
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
        h = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, name="token_embedding")(input_ids)
        h = h + Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt,
                      name="position_embedding")(jnp.arange(length))
        for i in range(cfg.num_hidden_layers):
            h = CLIPEncoderLayer(cfg, dtype=dt, name=f"layers_{i}")(h)
        return LayerNorm(cfg.layer_norm_eps, dtype=dt, name="final_layer_norm")(h)


def pooled_output(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """HF's pooler_output: the hidden state at the first end-of-text token (B, hidden).

    Configs with the pre-2023 eos_token_id == 2 use the largest token id instead, as HF does.
    """
    ids = input_ids.astype(jnp.int32)
    pos = jnp.argmax(ids, axis=-1) if eos_token_id == 2 else jnp.argmax(ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]
