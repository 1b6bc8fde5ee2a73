"""diffusers SD 1.5 folders in and out (unet/, vae/, text_encoder/, scheduler/, tokenizer/, model_index.json).

In:  `is_diffusers_folder`, `config_from_diffusers` (a mode-'sd' config, or 'local'/'global'/'cnc' when the folder
     has our local_fuser/ / global_fuser/), `diffusers_state_dict` (the folder as an official state dict, checked
     key by key and shape by shape in diffusers names first), so the official converters take it unchanged.
Out: `write_diffusers`, configs as diffusers 0.42 / transformers 5 write them for that model, plus local_fuser/ and
     global_fuser/ (safetensors with the official key names and a config.json); model_index.json lists only the
     components diffusers knows, so `StableDiffusionPipeline.from_pretrained` loads the SD part as it is. The
     scheduler config holds every key another scheduler class would otherwise default differently
     (`scheduler_call`: the `from_config` line of each of our samplers); the tokenizer is written in both
     transformers layouts (cnc_jax.text_encoder.save_tokenizer).
Names come from diffusers_names (diffusers <-> official) and names (official <-> ours).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict
from safetensors import SafetensorError
from safetensors.numpy import save_file

from cnc_jax.checkpoint import diffusers_names as dn
from cnc_jax.checkpoint import names
from cnc_jax.checkpoint.convert import ConversionError, ConversionReport
from cnc_jax.checkpoint.library_errors import library_os_error
from cnc_jax.checkpoint.official import load_official_params, official_tensors
from cnc_jax.io import atomic_path, progress_bar
from cnc_jax.model_config import (CnCConfig, ConfigError, DiffusionConfig, GlobalFuserConfig, LocalFuserConfig,
                                  TextEncoderConfig, UNetConfig, VAEConfig)
from cnc_jax.models.build import abstract_params, parts_of
from cnc_jax.text_encoder import check_tokenizer, save_tokenizer
from cnc_jax.torchfile.state_dict import load_state_dict

DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.24.0"
SD_PARTS = ("unet", "vae", "text_encoder")
FUSERS = {"local_fuser": ("LocalFuser", "local_adapter."), "global_fuser": ("GlobalFuser", "global_adapter.")}
FUSER_WEIGHTS = "model.safetensors"

# SD 1.5's scheduler as any class our samplers name reads it through `Class.from_config(pipe.scheduler.config)`
# (a key a class does not take is dropped there without a warning: the classes are each other's compatibles). The
# hub's PNDMScheduler config plus every key whose diffusers 0.42 class default differs from what SD 1.5 needs;
# the default it replaces is in the comment. Betas and num_train_timesteps come from the model's config.
SD15_SCHEDULER = {
    "clip_sample": False,  # DDIMScheduler: True (clips the x0 prediction to [-1, 1]: another picture)
    "prediction_type": "epsilon",  # every class: epsilon; it is what the model predicts, so it is said
    "set_alpha_to_one": False,  # DDIMScheduler: True (the last step's alpha_prev 1, not alphas_cumprod[0])
    "skip_prk_steps": True,  # PNDMScheduler: False (Runge-Kutta warm-up steps, not SD 1.5's PLMS)
    "steps_offset": 1,  # every class: 0
    "timestep_spacing": "leading",  # DPMSolverMultistep, UniPCMultistep, EulerDiscrete, EulerAncestral: linspace
    "trained_betas": None,
}
# diffusers 0.42 class defaults a sampler's `from_config` line leaves out (scheduler_ref.json shows each one as a
# default of that class, tests/test_diffusers_interop.py); every other setting of a sampler is passed explicitly.
SCHEDULER_DEFAULTS = {
    "DPMSolverMultistepScheduler": {"solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                                    "use_karras_sigmas": False, "final_sigmas_type": "zero"},
    "UniPCMultistepScheduler": {"predict_x0": True, "lower_order_final": True, "use_karras_sigmas": False,
                                "final_sigmas_type": "zero"},
    "EulerDiscreteScheduler": {"interpolation_type": "linear"},
}

# UNet2DConditionModel settings cnc_jax implements (SD 1.5's); any other value is refused on reading.
_UNET_FIXED = {
    "act_fn": "silu", "addition_embed_type": None, "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None, "attention_type": "default", "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_norm": None, "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "upcast_attention": False,
}
_VAE_FIXED = {"act_fn": "silu", "force_upcast": True, "latents_mean": None, "latents_std": None,
              "mid_block_add_attention": True, "norm_num_groups": 32, "shift_factor": None,
              "use_post_quant_conv": True, "use_quant_conv": True}
_TEXT_FIXED = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "initializer_factor": 1.0,
               "initializer_range": 0.02, "model_type": "clip_text_model", "projection_dim": 512}
_UPCAST_OK = {"upcast_attention"}  # numerically the same in fp32


def is_diffusers_folder(path: str) -> bool:
    """model_index.json, or any of unet/, vae/, text_encoder/ with a config.json (then a missing one is reported)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_index.json")) or any(
        os.path.isfile(os.path.join(path, p, "config.json")) for p in SD_PARTS))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a diffusers SD folder has unet/, vae/ and text_encoder/, each with "
                          "config.json and its weights)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


def _check_fixed(path: str, data: dict, fixed: dict, lenient=()) -> None:
    bad = [f"{k}={data[k]!r} (cnc_jax implements {v!r})" for k, v in fixed.items()
           if k in data and data[k] != v and k not in lenient]
    if bad:
        raise ConfigError(f"{path}: unsupported settings: {', '.join(bad)}")


def _unet_config(path: str, d: dict) -> tuple[UNetConfig, int]:
    _check_fixed(path, d, _UNET_FIXED, lenient=_UPCAST_OK)
    try:
        channels = list(d["block_out_channels"])
        heads = d["attention_head_dim"]
        if not isinstance(heads, int):
            raise ConfigError(f"{path}: attention_head_dim {heads!r} per level is not supported (SD 1.5 has one int)")
        down = d["down_block_types"]
        attn = tuple(sorted((2 ** i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"), reverse=True))
        if list(d["up_block_types"]) != [t.replace("Down", "Up") for t in reversed(down)]:
            raise ConfigError(f"{path}: up_block_types do not mirror down_block_types")
        depth = d.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int):
            raise ConfigError(f"{path}: transformer_layers_per_block per level is not supported")
        cfg = UNetConfig(in_channels=d["in_channels"], out_channels=d["out_channels"], model_channels=channels[0],
                         channel_mult=tuple(c // channels[0] for c in channels), num_res_blocks=d["layers_per_block"],
                         attention_resolutions=attn, num_heads=heads, transformer_depth=depth,
                         context_dim=d["cross_attention_dim"],
                         use_linear_in_transformer=bool(d.get("use_linear_projection", False)))
        return cfg, int(d.get("sample_size", 64))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a UNet2DConditionModel config ({e})") from None


def _vae_config(path: str, d: dict) -> tuple[VAEConfig, float]:
    _check_fixed(path, d, _VAE_FIXED)
    try:
        channels = list(d["block_out_channels"])
        cfg = VAEConfig(embed_dim=d["latent_channels"], z_channels=d["latent_channels"], ch=channels[0],
                        ch_mult=tuple(c // channels[0] for c in channels), num_res_blocks=d["layers_per_block"],
                        in_channels=d["in_channels"], out_ch=d["out_channels"], resolution=d.get("sample_size", 256))
        return cfg, float(d.get("scaling_factor", 0.18215))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an AutoencoderKL config ({e})") from None


def _diffusion_config(folder: str, scale_factor: float) -> DiffusionConfig:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return DiffusionConfig(scale_factor=scale_factor)
    return scheduler_diffusion_config(_read_json(path), scale_factor, where=path)


def scheduler_diffusion_config(d: Mapping, scale_factor: float = 0.18215,
                               where: str = "scheduler_config.json") -> DiffusionConfig:
    """The beta schedule of a diffusers scheduler config (SD 1.5's where a key is absent)."""
    if d.get("beta_schedule", "scaled_linear") != "scaled_linear" or d.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(f"{where}: only beta_schedule 'scaled_linear' with prediction_type 'epsilon' is supported")
    return DiffusionConfig(timesteps=d.get("num_train_timesteps", 1000), linear_start=d.get("beta_start", 0.00085),
                           linear_end=d.get("beta_end", 0.012), scale_factor=scale_factor)


def config_from_diffusers(folder: str) -> CnCConfig:
    """The model of a diffusers folder: SD 1.5 (or its 9-channel inpainting variant), with our fusers if present."""
    missing = [p for p in SD_PARTS if not os.path.isdir(os.path.join(folder, p))]
    if missing:
        raise ConfigError(f"{folder}: no {', '.join(p + '/' for p in missing)} (a diffusers SD folder has unet/, "
                          "vae/ and text_encoder/)")
    unet, latent = _unet_config(os.path.join(folder, "unet", "config.json"),
                                _read_json(os.path.join(folder, "unet", "config.json")))
    vae, scale = _vae_config(os.path.join(folder, "vae", "config.json"),
                             _read_json(os.path.join(folder, "vae", "config.json")))
    text_path = os.path.join(folder, "text_encoder", "config.json")
    text = TextEncoderConfig.from_hf_dict(_read_json(text_path), source=text_path)
    fusers = {}
    for part, (cls, _) in FUSERS.items():
        path = os.path.join(folder, part, "config.json")
        if os.path.isdir(os.path.dirname(path)):
            d = {k: v for k, v in _read_json(path).items() if not k.startswith("_")}
            try:
                fusers[part] = (LocalFuserConfig if part == "local_fuser" else GlobalFuserConfig)(**d)
            except TypeError as e:
                raise ConfigError(f"{path}: not a {cls} config ({e})") from None
    if "local_fuser" in fusers:  # the same levels in the order the model config was written in (no semantic change)
        unet = dataclasses.replace(unet, attention_resolutions=fusers["local_fuser"].attention_resolutions)
    mode = {(True, True): "cnc", (True, False): "local", (False, True): "global", (False, False): "sd"}[
        ("local_fuser" in fusers, "global_fuser" in fusers)]
    try:
        return CnCConfig(mode=mode, unet=unet, local_fuser=fusers.get("local_fuser"),
                         global_fuser=fusers.get("global_fuser"), vae=vae, text_encoder=text,
                         diffusion=_diffusion_config(folder, scale), latent_size=latent)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None


class _Reshaped:
    """A lazily read tensor seen with another shape (diffusers' VAE attention Linear as the LDM 1x1 conv)."""

    def __init__(self, tensor, shape):
        self._tensor, self.shape = tensor, tuple(shape)

    def numpy(self):
        return np.asarray(self._tensor.numpy()).reshape(self.shape)


def _diffusers_shape(part: str, key: str, official_shape: tuple[int, ...]) -> tuple[int, ...]:
    return official_shape[:2] if dn.is_vae_linear(part, key) else official_shape


def _weights_file(folder: str, part: str) -> str:
    weights = os.path.join(folder, part, dn.PARTS[part][2] if part in dn.PARTS else FUSER_WEIGHTS)
    if not os.path.isfile(weights):
        other = [n for n in os.listdir(os.path.join(folder, part))] if os.path.isdir(os.path.join(folder, part)) else []
        hint = " (only .safetensors weights are read; convert .bin files with diffusers first)" if any(
            n.endswith(".bin") for n in other) else ""
        raise ConversionError(f"{weights}: missing{hint}")
    return weights


def diffusers_state_dict(folder: str, config: CnCConfig, parts: Optional[Iterable[str]] = None) -> dict:
    """{official key: lazy tensor} of the folder's `parts` (default: all our config has), after checking every
    diffusers key and shape against `config` (one report, diffusers names)."""
    parts = tuple(parts or parts_of(config))
    report = ConversionReport()
    state: dict = {}
    for part in parts:
        target = flatten_dict({part: abstract_params(config, [part])[part]})
        keys, _ = names.official_keys(target)
        weights = _weights_file(folder, part)
        where = os.path.relpath(weights, folder)
        tensors = load_state_dict(weights)
        if part in FUSERS:
            expected = {k: (k, tuple(names.ours_shape_to_official(tuple(target[p].shape), p[-1])))
                        for p, k in keys.items()}
        else:
            expected = {dn.to_diffusers(config, part, k): (k, names.ours_shape_to_official(tuple(target[p].shape),
                                                                                           p[-1]))
                        for p, k in keys.items()}
        for key, tensor in tensors.items():
            if part == "text_encoder" and key.endswith("embeddings.position_ids"):
                continue
            lookup = key if part in FUSERS or part != "text_encoder" or key.startswith("text_model.") \
                else "text_model." + key
            if lookup not in expected:
                report.unexpected.append(f"{where}: {key}")
                continue
            official, shape = expected.pop(lookup)
            want = _diffusers_shape(part, lookup, tuple(shape))
            if tuple(tensor.shape) != want:
                report.mismatched.append(f"{where}: {key}: file {tuple(tensor.shape)} vs config {want}")
                continue
            state[official] = _Reshaped(tensor, shape) if want != tuple(shape) else tensor
        report.missing += [f"{where}: {k}" for k in expected]
    if not report.ok:
        raise ConversionError(report.format(folder), report)
    return state


def load_diffusers(folder: str, config: Optional[CnCConfig] = None, parts=None) -> tuple[CnCConfig, dict]:
    """(config, {part: numpy params}) of a diffusers folder (config from its config files unless given)."""
    config = config or config_from_diffusers(folder)
    state = diffusers_state_dict(folder, config, parts)
    return config, load_official_params(state, config, parts)


# ---- writing -------------------------------------------------------------------------------------------------

def unet_config_json(config: CnCConfig) -> dict:
    u = config.unet
    if u.num_head_channels != -1:
        raise ConfigError("diffusers export needs num_heads (SD 1.5 style), not num_head_channels")
    down = ["CrossAttnDownBlock2D" if 2 ** i in u.attention_resolutions else "DownBlock2D"
            for i in range(len(u.channel_mult))]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **_UNET_FIXED,
            "attention_head_dim": u.num_heads, "block_out_channels": list(u.level_channels),
            "cross_attention_dim": u.context_dim, "down_block_types": down, "in_channels": u.in_channels,
            "layers_per_block": u.num_res_blocks, "out_channels": u.out_channels, "sample_size": config.latent_size,
            "transformer_layers_per_block": u.transformer_depth,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "use_linear_projection": u.use_linear_in_transformer}


def vae_config_json(config: CnCConfig) -> dict:
    v = config.vae
    if v.attn_resolutions or not v.double_z or v.embed_dim != v.z_channels:
        raise ConfigError("diffusers' AutoencoderKL has no attention outside the mid block, double_z and "
                          "embed_dim == z_channels; this VAE differs")
    n = len(v.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **_VAE_FIXED,
            "block_out_channels": [v.ch * m for m in v.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
            "in_channels": v.in_channels, "latent_channels": v.z_channels, "layers_per_block": v.num_res_blocks,
            "out_channels": v.out_ch, "sample_size": config.latent_size * v.downsample_factor,  # image side
            "scaling_factor": config.diffusion.scale_factor,
            "up_block_types": ["UpDecoderBlock2D"] * n}


def text_config_json(config: CnCConfig) -> dict:
    return {**_TEXT_FIXED, **dataclasses.asdict(config.text_encoder), "transformers_version": TRANSFORMERS_VERSION}


def scheduler_config_json(config: CnCConfig) -> dict:
    """SD 1.5's PNDMScheduler config with the model's betas, readable by every scheduler class (SD15_SCHEDULER)."""
    d = config.diffusion
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": d.linear_end,
            "beta_schedule": "scaled_linear", "beta_start": d.linear_start, "num_train_timesteps": d.timesteps,
            **SD15_SCHEDULER}


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b  # False is not 0 here


def scheduler_kwargs(scheduler_class: str, settings: Mapping) -> dict:
    """The `from_config` keyword arguments that make `scheduler_class` with `settings` (diffusers config entries)
    out of our exported scheduler config: the settings neither that config nor the class default already gives."""
    defaults = SCHEDULER_DEFAULTS.get(scheduler_class, {})
    given = {**defaults, **SD15_SCHEDULER}
    kept = [(k, v) for k, v in settings.items() if k not in given or not _same(given[k], v)]
    return dict(sorted(kept, key=lambda kv: kv[0] in defaults))  # what the sampler is first, then its variant


def scheduler_call(scheduler_class: str, settings: Mapping, config: str = "pipe.scheduler.config") -> str:
    """The line a diffusers user types to build that scheduler from our export (the README's sampler table)."""
    args = [config] + [f"{k}={json.dumps(v) if isinstance(v, str) else repr(v)}"
                       for k, v in scheduler_kwargs(scheduler_class, settings).items()]
    return f"{scheduler_class}.from_config({', '.join(args)})"


def model_index_json(config: CnCConfig, has_tokenizer: bool) -> dict:
    pipeline = "StableDiffusionInpaintPipeline" if config.unet.in_channels == 9 else "StableDiffusionPipeline"
    return {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None],
            "image_encoder": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"] if has_tokenizer else [None, None],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_safetensors(file: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None, *,
                     name: str | None = None) -> None:
    """safetensors' save_file (metadata format=pt, as torch users expect); its disk errors (SafetensorError, no
    OSError) are the OSError they stand for, naming `name` (the output the file is part of; default `file`).
    It writes a hidden temporary file (.tmpXXXXXX) beside `file` first: `file` belongs inside a partial folder."""
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file,
                  metadata={"format": "pt", **(metadata or {})})
    except SafetensorError as e:
        disk = library_os_error(e, name or file)
        if disk is None:
            raise
        raise disk from None


def diffusers_tensors(config: CnCConfig, params: Mapping[str, dict], dtype: Optional[str] = None) -> dict:
    """{folder part: {key: array}} in the diffusers layout (SD parts) and official names (fusers)."""
    out = {}
    for part in params:
        tensors = official_tensors({part: params[part]}, dtype)
        if part in FUSERS:
            out[part] = tensors
            continue
        files = {}
        for key, array in tensors.items():
            name = dn.to_diffusers(config, part, key)
            if name is None:
                raise ConversionError(f"{key}: no diffusers name")
            files[name] = array.reshape(array.shape[:2]) if dn.is_vae_linear(part, name) else array
        out[part] = files
    return out


def write_diffusers(out: str, config: CnCConfig, params: Mapping[str, dict], *, dtype: Optional[str] = None,
                    tokenizer: Optional[str] = None, overwrite: bool = False) -> str:
    """The model as a diffusers folder at `out`, atomically. tokenizer: a tokenizer folder (either layout) or
    'byte_level'; without one, model_index.json lists the tokenizer as [null, null]."""
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} already exists (pass --force to replace it)")
    if tokenizer:
        check_tokenizer(tokenizer, config.text_encoder.vocab_size)
    configs = {"unet": unet_config_json(config), "vae": vae_config_json(config),
               "text_encoder": text_config_json(config)}
    for part, (cls, _) in FUSERS.items():
        sub = getattr(config, part)
        if sub is not None:
            configs[part] = {"_class_name": cls, "_cnc_jax_format": "cnc_jax/1", **dataclasses.asdict(sub)}
    files = diffusers_tensors(config, params, dtype)
    try:  # every file, safetensors' own temporary ones included, is written inside the partial folder
        with atomic_path(out) as tmp, progress_bar(sum(a.nbytes for f in files.values() for a in f.values()),
                                                   f"write {os.path.basename(out)}") as bar:
            for part, tensors in files.items():
                weights = dn.PARTS[part][2] if part in dn.PARTS else FUSER_WEIGHTS
                os.makedirs(os.path.join(tmp, part))
                save_safetensors(os.path.join(tmp, part, weights), tensors, name=out)
                bar.update(sum(a.nbytes for a in tensors.values()))
                _write_json(os.path.join(tmp, part, "config.json"), configs[part])
            _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config_json(config))
            _write_json(os.path.join(tmp, "model_index.json"), model_index_json(config, bool(tokenizer)))
            if tokenizer:
                save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"), config.text_encoder.max_position_embeddings)
    except OSError as e:  # a write() error names no file: name the output
        raise library_os_error(e, out) from None
    return out
