"""cnc_jax parameter trees -> the official state dict, and the files a trained model leaves as.

  official_state_dict : {part: tree} -> {official key: numpy array}, every key the official model's
                        state_dict() has (the 13 diffusion-schedule buffers and CLIP's position_ids included)
  check_params        : the merged model against its config, one report of everything that does not fit
  export_model        : write one of FORMATS (cnc folder, official .ckpt, .safetensors, diffusers folder), atomically

Key names come from names.official_keys (the reverse of the one name table); nothing here knows a name.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping, Optional

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from cnc_jax.checkpoint import names
from cnc_jax.torchfile import torch_save
from cnc_jax.checkpoint.convert import ConversionError, ConversionReport
from cnc_jax.checkpoint.diffusers import write_diffusers
from cnc_jax.checkpoint.store import save_converted
from cnc_jax.model_config import CnCConfig, DiffusionConfig
from cnc_jax.diffusion import linear_betas
from cnc_jax.io import atomic_path
from cnc_jax.models.build import abstract_params
from flax.traverse_util import flatten_dict

FORMATS = ("cnc", "official", "safetensors", "diffusers")
DTYPES = ("float32", "float16", "bfloat16")
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def schedule_buffers(cfg: DiffusionConfig) -> dict[str, np.ndarray]:
    """The 13 persistent buffers of ldm's DDPM.register_schedule: float64 numpy, stored as float32."""
    betas = linear_betas(cfg)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(cfg.timesteps),  # logvar_init 0
    }
    return {k: np.asarray(v, np.float32) for k, v in buffers.items()}


def _cast(array: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    if dtype is None or not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        return array
    return array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def official_tensors(params: Mapping[str, dict], dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """{official key: array in the official layout} of our parameters only (no buffers)."""
    flat = flatten_dict(dict(params))
    keys, unmapped = names.official_keys(flat)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} parameters have no official name: {', '.join(unmapped[:20])}")
    return {keys[path]: _cast(np.ascontiguousarray(names.to_official(np.asarray(value), path[-1])), dtype)
            for path, value in flat.items()}


def official_state_dict(config: CnCConfig, params: Mapping[str, dict], dtype: Optional[str] = None) -> dict:
    """Every entry of the official model's state_dict(): schedule buffers, then the parts' weights."""
    state = OrderedDict(schedule_buffers(config.diffusion))
    for part in ("unet", "vae", "text_encoder", "local_fuser", "global_fuser"):  # the official module order
        if part in params:
            state.update(official_tensors({part: params[part]}, dtype))
    if "text_encoder" in params:
        positions = config.text_encoder.max_position_embeddings
        state[POSITION_IDS_KEY] = np.arange(positions, dtype=np.int64)[None]
    return state


def check_params(config: CnCConfig, params: Mapping[str, dict], source: str = "model") -> None:
    """Raise ConversionError listing every leaf that is missing, unexpected or of another shape than `config`."""
    want, have = flatten_dict(abstract_params(config)), flatten_dict(dict(params))
    report = ConversionReport(
        missing=sorted("/".join(p) for p in want.keys() - have.keys()),
        unexpected=sorted("/".join(p) for p in have.keys() - want.keys()),
        mismatched=sorted(f"{'/'.join(p)}: {tuple(np.shape(have[p]))} vs config {tuple(want[p].shape)}"
                          for p in want.keys() & have.keys() if tuple(np.shape(have[p])) != tuple(want[p].shape)))
    if not report.ok:
        raise ConversionError(report.format(source))


def progress_bar(total_bytes: int, desc: str):
    """Bytes written so far (the full-size models are several GB)."""
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


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
    return _cast(np.asarray(tree), dtype)
