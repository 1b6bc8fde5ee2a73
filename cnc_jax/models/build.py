"""Build the model parts of a CnCConfig: modules, example inputs, abstract / initial parameters.

A model is a set of parts, each with its own parameter tree:
  'unet', 'local_fuser', 'global_fuser'  -> the CnC diffusion module (cnc_jax.models.cnc.CnC)
  'vae'                                  -> AutoencoderKL
  'text_encoder'                         -> CLIP text transformer
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import CnCConfig
from cnc_jax.models.clip_text import CLIPTextTransformer
from cnc_jax.models.cnc import CnC
from cnc_jax.models import params as module_params
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


@functools.lru_cache(maxsize=32)
def _trace_group(config: CnCConfig, group: str) -> dict:
    """Boxed abstract params ({part: tree}) of one part group: 'diffusion', 'vae' or 'text_encoder'.

    Tracing is the slow part of building trees, so each (config, group) is traced once per process.
    """
    if group == "diffusion":
        module, args = CnC(config), diffusion_inputs(config)
    elif group == "vae":
        side = 8 * config.vae.downsample_factor
        module, args = AutoencoderKL(config.vae), dict(x=jnp.zeros((1, side, side, config.vae.in_channels)))
    else:
        ids = jnp.zeros((1, config.text_encoder.max_position_embeddings), jnp.int32)
        module, args = CLIPTextTransformer(config.text_encoder), dict(input_ids=ids)
    variables = module_params.trace(module, args, boxed=True)
    return variables if group == "diffusion" else {group: variables}


def _abstract(config: CnCConfig, parts: tuple[str, ...]) -> dict:
    """{part: boxed abstract tree} for the requested parts."""
    trees = {}
    for group in dict.fromkeys("diffusion" if p in DIFFUSION_PARTS else p for p in parts):
        trees.update({p: v for p, v in _trace_group(config, group).items() if p in parts})
    return trees


def _parts(config: CnCConfig, parts: Optional[Iterable[str]]) -> tuple[str, ...]:
    parts = tuple(parts) if parts is not None else parts_of(config)
    unknown = set(parts) - set(parts_of(config))
    if unknown:
        raise ValueError(f"mode {config.mode!r} has no {sorted(unknown)} (it has {parts_of(config)})")
    return parts


def abstract_params(config: CnCConfig, parts: Optional[Iterable[str]] = None, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters ({part: tree of ShapeDtypeStruct}); allocates nothing.

    With boxed=True leaves are nn.Partitioned (they carry the logical axis names).
    """
    trees = _abstract(config, _parts(config, parts))
    return trees if boxed else nn.unbox(trees)


def init_params(config: CnCConfig, seed: int = 0, parts: Optional[Iterable[str]] = None) -> dict:
    """Fresh parameters as the official code initialises new layers ({part: numpy tree}).

    torch defaults (uniform +-1/sqrt(fan_in) for linear/conv, ones/zeros for norms, N(0,1) embeddings),
    zero convs zero. Drawn on the host with numpy, per parameter from (seed, its path): no compilation,
    and a parameter's value does not depend on which other parts are initialised with it.
    """
    return module_params.fresh(_abstract(config, _parts(config, parts)), seed)


def logical_axes(config: CnCConfig, parts: Optional[Iterable[str]] = None) -> dict:
    """Logical axis names of every parameter ({part: tree of PartitionSpec})."""
    return nn.get_partition_spec(abstract_params(config, parts, boxed=True))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
