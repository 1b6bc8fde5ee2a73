"""Parameters of any linen module without running it: abstract shapes, and fresh host-side values.

`trace` runs `module.init` under jax.eval_shape (nothing allocated); every leaf of the boxed tree is a
`layers.InitialisedParam` carrying its logical axis names and its initialiser. `fresh` then draws every leaf
with numpy from (seed, its path): no compilation, torch's default inits, zero convs zero, and a leaf's value
does not depend on the rest of the tree. The per-model `abstract_params` / `init_params` (cnc_jax.models.build
for CnC, each annotator / eval model's module for itself) are these two on the model's module and inputs.
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cnc_jax.models.layers import InitialisedParam


def trace(module: nn.Module, inputs: dict, *, boxed: bool = False) -> dict:
    """Abstract params of `module.init(rng, **inputs)`: boxed (InitialisedParam leaves) or ShapeDtypeStructs."""
    params = jax.eval_shape(lambda rng: module.init(rng, **inputs), jax.random.PRNGKey(0))["params"]
    return params if boxed else nn.unbox(params)


def fresh(boxed_tree: dict, seed: int = 0) -> dict:
    """Numpy values for a boxed abstract tree, each leaf from its own initialiser and (seed, its path)."""
    flat = {}
    for path, leaf in flatten_dict(boxed_tree).items():
        if not isinstance(leaf, InitialisedParam):
            raise TypeError(f"parameter {'/'.join(path)} was not made by cnc_jax.models.layers (no initialiser)")
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        flat[path] = leaf.init.numpy(rng, leaf.value.shape, leaf.value.dtype)
    return unflatten_dict(flat)


def init(module: nn.Module, inputs: dict, seed: int = 0) -> dict:
    """Fresh numpy parameters of a module (see module docstring)."""
    return fresh(trace(module, inputs, boxed=True), seed)
