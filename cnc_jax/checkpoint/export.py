"""The files a trained model leaves as: export_model writes one of FORMATS (cnc folder, official .ckpt,
.safetensors, diffusers folder), atomically, after checking the merged model against its config
(cnc_jax.checkpoint.official.check_params). The official state dict itself is cnc_jax.checkpoint.official's.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping, Optional

import numpy as np
from safetensors.numpy import save_file

from cnc_jax.checkpoint.diffusers import write_diffusers
from cnc_jax.checkpoint.official import cast_array, check_params, official_state_dict
from cnc_jax.checkpoint.store import save_converted
from cnc_jax.io import atomic_path, progress_bar
from cnc_jax.model_config import CnCConfig
from cnc_jax.torchfile import torch_save

FORMATS = ("cnc", "official", "safetensors", "diffusers")
DTYPES = ("float32", "float16", "bfloat16")


def write_official(path: str, state: Mapping[str, np.ndarray], **extra) -> None:
    """`{"state_dict": ...}` (plus `extra`, e.g. global_step) as a torch zip file, atomically."""
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            progress_bar(sum(a.nbytes for a in state.values()), f"write {os.path.basename(path)}") as bar:
        torch_save.write_torch_zip(f, {"state_dict": OrderedDict(state), **extra}, archive, on_tensor=bar.update)


def write_safetensors(path: str, state: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """One .safetensors file (the `safetensors` package; metadata format=pt as torch users expect), atomically."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})


def export_model(config: CnCConfig, params: Mapping[str, dict], out: str, fmt: str, *,
                 dtype: Optional[str] = None, info: Optional[dict] = None, tokenizer: Optional[str] = None,
                 overwrite: bool = False) -> str:
    """Write the model in format `fmt` to `out` (a file for official/safetensors, a folder otherwise).

    The merged params are checked against the config first; nothing appears at `out` unless the write succeeded.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} already exists (pass --force to replace it)")
    check_params(config, params)
    if fmt == "cnc":
        cast = {part: _cast_tree(tree, dtype) for part, tree in params.items()}
        return save_converted(out, config, cast, overwrite=overwrite, **(info or {}))
    if fmt == "diffusers":
        return write_diffusers(out, config, params, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)
    state = official_state_dict(config, params, dtype)
    if fmt == "official":
        write_official(out, state)
    else:
        write_safetensors(out, state)
    return out


def _cast_tree(tree, dtype: Optional[str]):
    if isinstance(tree, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in tree.items()}
    return cast_array(np.asarray(tree), dtype)
