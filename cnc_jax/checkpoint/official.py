"""The official state dict in and out, and the official prepare_weights.py steps.

  load_official_params  : an official CnC / fuser / SD ckpt -> {part: params} for a config
  official_state_dict   : {part: tree} -> {official key: numpy array}, every key the official model's
                          state_dict() has (the 13 diffusion-schedule buffers and CLIP's position_ids included)
  check_params          : a merged model against its config, one report of everything that does not fit
  detect_config         : which preset an official checkpoint is (from the parts it contains)
  init_global_params    : SD-1.5 weights + a fresh global fuser            (prepare_weights init_global)
  init_local_params     : local fuser initialised from Uni-ControlNet's local adapter (init_local_fromuni)
                          or from the SD UNet encoder (init_local)
  integrate_params      : trained local + trained global -> cnc               (prepare_weights integrate)

Key names come from names (the one official <-> ours table, both directions); nothing here knows a name.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Optional

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cnc_jax import model_config as config_lib
from cnc_jax.checkpoint import names
from cnc_jax.checkpoint.convert import ConversionError, ConversionReport, convert_state_dict
from cnc_jax.diffusion import linear_betas
from cnc_jax.model_config import CnCConfig, DiffusionConfig
from cnc_jax.models.build import abstract_params, init_params, parts_of
from cnc_jax.torchfile.state_dict import load_state_dict

POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def parts_in_state_dict(state_dict: Mapping[str, object]) -> set[str]:
    parts = set()
    for key in state_dict:
        split = names.split_prefix(key)
        if split:
            parts.add(split[0])
    return parts


def detect_config(state_dict: Mapping[str, object]) -> CnCConfig:
    """The full-size preset matching the adapters an official checkpoint carries."""
    parts = parts_in_state_dict(state_dict)
    local, glob = "local_fuser" in parts, "global_fuser" in parts
    name = {(True, True): "cnc_v1", (True, False): "local_fuser_v1", (False, True): "global_fuser_v1",
            (False, False): "sd15"}[(local, glob)]
    return config_lib.PRESETS[name]()


def load_official_params(source, config: CnCConfig, parts: Optional[Iterable[str]] = None, *,
                         ema: bool = False, skip_other_parts: bool = False) -> dict:
    """{part: numpy tree} from an official checkpoint path (or an already loaded state dict).

    Raises ConversionError listing every missing / unexpected / mis-shaped key; reads no tensor data
    before the whole checkpoint is known to fit.
    """
    state_dict = load_state_dict(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") \
        else source
    targets = abstract_params(config, parts)
    params, _ = convert_state_dict(state_dict, targets, ema=ema, source=str(source) if not isinstance(
        source, Mapping) else "state dict", skip_other_parts=skip_other_parts)
    return params


def _fresh(config: CnCConfig, part: str, seed: int) -> dict:
    return init_params(config, seed, [part])[part]


def init_global_params(sd_source, config: Optional[CnCConfig] = None, seed: int = 0) -> tuple[CnCConfig, dict]:
    """prepare_weights init_global: UNet / VAE / text from SD 1.5, a freshly initialised global fuser."""
    config = config or config_lib.global_fuser_v1()
    if not config.has_global or config.has_local:
        raise ValueError("init-global needs a mode 'global' config")
    sd_parts = [p for p in parts_of(config) if p != "global_fuser"]
    params = load_official_params(sd_source, config, sd_parts, skip_other_parts=True)
    params["global_fuser"] = _fresh(config, "global_fuser", seed)
    return config, params


def init_local_params(source, config: Optional[CnCConfig] = None, seed: int = 0) -> tuple[CnCConfig, list[str], dict]:
    """prepare_weights init_local_fromuni / init_local.

    Every local-fuser weight whose official name exists in the source with the same shape is copied:
    from `local_adapter.*` for a Uni-ControlNet checkpoint, else from the SD UNet encoder
    (`model.diffusion_model.*`, ControlNet-style). The rest (feature extractor, FDN convs, zero convs, ...)
    is freshly initialised (zero convs zero) and listed. UNet / VAE / text come from the source.
    Returns (config, names of new local-fuser leaves, params).
    """
    config = config or config_lib.local_fuser_v1()
    if not config.has_local or config.has_global:
        raise ValueError("init-local needs a mode 'local' config")
    state_dict = load_state_dict(source) if not isinstance(source, Mapping) else source
    base_parts = [p for p in parts_of(config) if p != "local_fuser"]
    params = load_official_params(state_dict, config, base_parts, skip_other_parts=True)

    from_uni = "local_fuser" in parts_in_state_dict(state_dict)
    prefix = "local_adapter." if from_uni else "model.diffusion_model."
    renamed = {"local_adapter." + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    target = abstract_params(config, ["local_fuser"])
    flat_target = flatten_dict(target)
    fresh = flatten_dict({"local_fuser": _fresh(config, "local_fuser", seed)})
    flat = dict(fresh)
    copied = set()
    for key, tensor in renamed.items():
        where = names.our_path(key)
        if where is None:
            continue
        part, module, leaf = where
        for cand in (names.WEIGHT_LEAVES if leaf == "weight" else (leaf,)):
            path = (part,) + module + (cand,)
            if path in flat_target:
                want = names.ours_shape_to_official(tuple(flat_target[path].shape), cand)
                if tuple(tensor.shape) == want:
                    array = names.to_ours(np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor), cand)
                    flat[path] = array.astype(flat_target[path].dtype)
                    copied.add(path)
                break
    if not copied:
        raise ConversionError(f"{source}: no local-fuser weight could be initialised from it "
                              "(neither a Uni-ControlNet nor an SD checkpoint?)")
    new = sorted("/".join(p) for p in fresh if p not in copied)
    params.update(unflatten_dict(flat))
    return config, new, params


def integrate_params(local: tuple[CnCConfig, dict], glob: tuple[CnCConfig, dict],
                     config: Optional[CnCConfig] = None) -> tuple[CnCConfig, dict]:
    """prepare_weights integrate: the shared SD parts must be identical in both; adapters from each."""
    (lcfg, lparams), (gcfg, gparams) = local, glob
    if not lcfg.has_local or not gcfg.has_global:
        raise ValueError("integrate needs a local-fuser model first and a global-fuser model second")
    config = config or CnCConfig(mode="cnc", unet=lcfg.unet, local_fuser=lcfg.local_fuser,
                                 global_fuser=gcfg.global_fuser, vae=lcfg.vae, text_encoder=lcfg.text_encoder,
                                 diffusion=lcfg.diffusion, latent_size=lcfg.latent_size)
    out = {"local_fuser": lparams["local_fuser"], "global_fuser": gparams["global_fuser"]}
    differing = []
    for part in ("unet", "vae", "text_encoder"):
        fl, fg = flatten_dict(lparams[part]), flatten_dict(gparams[part])
        if fl.keys() != fg.keys():
            raise ConversionError(f"integrate: the {part} trees of the two models differ in structure")
        differing += [f"{part}/{'/'.join(k)}" for k in fl
                      if fl[k].shape != fg[k].shape or not np.array_equal(np.asarray(fl[k]), np.asarray(fg[k]))]
        out[part] = lparams[part]
    if differing:
        listed = "\n  ".join(differing[:20]) + (f"\n  ... and {len(differing) - 20} more" if len(differing) > 20 else "")
        raise ConversionError(f"integrate: {len(differing)} shared weights differ between the local and the global "
                              f"model (they must come from the same SD 1.5):\n  {listed}")
    return config, out


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


def cast_array(array: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    if dtype is None or not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        return array
    return array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def official_tensors(params: Mapping[str, dict], dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """{official key: array in the official layout} of our parameters only (no buffers)."""
    flat = flatten_dict(dict(params))
    keys, unmapped = names.official_keys(flat)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} parameters have no official name: {', '.join(unmapped[:20])}")
    return {keys[path]: cast_array(np.ascontiguousarray(names.to_official(np.asarray(value), path[-1])), dtype)
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
        raise ConversionError(report.format(source), report)
