"""Parameters of any linen module without running it: abstract shapes, and fresh host-side values.

`abstract` traces `module.init` under jax.eval_shape (nothing allocated) and records each parameter's
initialiser (layers.Init); `fresh` then draws every leaf with numpy from (seed, its path): no compilation,
torch's default inits, zero convs zero, and a leaf's value does not depend on the rest of the tree.
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import numpy as np

from cnc_jax.models.layers import record_inits
from flax.traverse_util import flatten_dict, unflatten_dict


def abstract(module: nn.Module, inputs: dict) -> tuple[dict, dict]:
    """(boxed abstract params, {param path: Init}) of `module.init(rng, **inputs)`."""
    with record_inits() as recorded:
        variables = jax.eval_shape(lambda rng: module.init(rng, **inputs), jax.random.PRNGKey(0))
    return variables["params"], dict(recorded)


def abstract_params(module: nn.Module, inputs: dict, *, boxed: bool = False) -> dict:
    params = abstract(module, inputs)[0]
    return params if boxed else nn.unbox(params)


def fresh(abstract_tree: dict, inits: dict, seed: int = 0, prefix: tuple[str, ...] = ()) -> dict:
    """Numpy values for an (unboxed) abstract tree; `inits` keys are paths below `prefix`."""
    flat = {}
    for path, leaf in flatten_dict(abstract_tree).items():
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        flat[path] = inits[path[len(prefix):]].numpy(rng, leaf.shape, leaf.dtype)
    return unflatten_dict(flat)


def init_params(module: nn.Module, inputs: dict, seed: int = 0) -> dict:
    """Fresh numpy parameters of a module (see module docstring)."""
    tree, inits = abstract(module, inputs)
    return fresh(nn.unbox(tree), inits, seed)
