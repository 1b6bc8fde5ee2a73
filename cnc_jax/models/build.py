"""Build the model parts of a CnCConfig: modules, example inputs, abstract / initial parameters.

A model is a set of parts, each with its own parameter tree:
  'unet', 'local_fuser', 'global_fuser'  -> the CnC diffusion module (cnc_jax.models.cnc.CnC)
  'vae'                                  -> AutoencoderKL
  'text_encoder'                         -> CLIP text transformer
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.config import CnCConfig
from cnc_jax.models.clip_text import CLIPTextTransformer
from cnc_jax.models.cnc import CnC
from cnc_jax.models.vae import AutoencoderKL

DIFFUSION_PARTS = ("unet", "local_fuser", "global_fuser")
ALL_PARTS = DIFFUSION_PARTS + ("vae", "text_encoder")


def parts_of(config: CnCConfig) -> tuple[str, ...]:
    """The parts a config has, in canonical order."""
    present = {"unet", "vae", "text_encoder"}
    if config.has_local:
        present.add("local_fuser")
    if config.has_global:
        present.add("global_fuser")
    return tuple(p for p in ALL_PARTS if p in present)


def diffusion_inputs(config: CnCConfig, batch: int = 1, latent_hw: Optional[tuple[int, int]] = None) -> dict:
    """Zero inputs of the right shapes for CnC.__call__ (keyword arguments)."""
    levels = len(config.unet.channel_mult)
    h, w = latent_hw or (2 ** (levels - 1),) * 2
    context_dim = config.unet.context_dim
    inputs = dict(x=jnp.zeros((batch, h, w, config.unet.in_channels)), timesteps=jnp.zeros((batch,), jnp.int32),
                  text_context=jnp.zeros((batch, config.text_encoder.max_position_embeddings, context_dim)))
    if config.has_local:
        inputs["fg_depth"] = inputs["bg_depth"] = jnp.zeros((batch, 8 * h, 8 * w, config.local_fuser.local_channels))
    if config.has_global:
        inputs["fg_emb"] = inputs["bg_emb"] = jnp.zeros((batch, config.global_fuser.in_dim))
        inputs["mask"] = jnp.zeros((batch, 8 * h, 8 * w, 1))
    return inputs


def _part_inits(config: CnCConfig, dtype) -> dict[str, tuple[nn.Module, Any]]:
    """part group -> (module, init function of an rng)."""
    cnc = CnC(config, dtype=dtype)
    vae = AutoencoderKL(config.vae, dtype=dtype)
    text = CLIPTextTransformer(config.text_encoder, dtype=dtype)
    image = jnp.zeros((1, 8 * config.vae.downsample_factor, 8 * config.vae.downsample_factor, config.vae.in_channels))
    ids = jnp.zeros((1, config.text_encoder.max_position_embeddings), jnp.int32)
    return {
        "diffusion": (cnc, lambda rng: cnc.init(rng, **diffusion_inputs(config))),
        "vae": (vae, lambda rng: vae.init(rng, image)),
        "text_encoder": (text, lambda rng: text.init(rng, ids)),
    }


def _group(part: str) -> str:
    return "diffusion" if part in DIFFUSION_PARTS else part


def init_params(config: CnCConfig, rng: jax.Array, parts: Optional[Iterable[str]] = None, *,
                boxed: bool = False, dtype=jnp.float32) -> dict:
    """Fresh parameters (torch-default init; zero convs zero), {part: tree}.

    With boxed=True leaves stay nn.Partitioned (they carry the logical axis names).
    """
    parts = tuple(parts or parts_of(config))
    inits = _part_inits(config, dtype)
    out = {}
    for i, group in enumerate(dict.fromkeys(_group(p) for p in parts)):
        variables = inits[group][1](jax.random.fold_in(rng, i))["params"]
        tree = variables if group == "diffusion" else {group: variables}
        out.update({p: v for p, v in tree.items() if p in parts})
    return out if boxed else nn.unbox(out)


def abstract_params(config: CnCConfig, parts: Optional[Iterable[str]] = None, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters ({part: tree of ShapeDtypeStruct}); allocates nothing."""
    return jax.eval_shape(lambda rng: init_params(config, rng, parts, boxed=boxed), jax.random.PRNGKey(0))


def logical_axes(config: CnCConfig, parts: Optional[Iterable[str]] = None) -> dict:
    """Logical axis names of every parameter ({part: tree of PartitionSpec})."""
    return nn.get_partition_spec(abstract_params(config, parts, boxed=True))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
