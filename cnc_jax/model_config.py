"""Model configurations: frozen dataclasses, the official presets, and the official YAML reader.

Every model in cnc_jax is built from a `CnCConfig`. Configs are frozen (hashable) so they can be
attributes of linen modules and static arguments of jitted functions, and they round-trip through
JSON so a converted checkpoint carries the exact architecture it was converted for.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

import yaml

MODES = ("local", "global", "cnc", "sd")


class ConfigError(ValueError):
    """A model config (preset name, YAML or JSON) is invalid; the message names the file and field."""


def _tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The LDM `UNetModel` as used by SD 1.5 (spatial transformers, conv proj_in/proj_out)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", _tuple(self.attention_resolutions))
        for c in self.level_channels + (self.model_channels,):
            if c % 32:
                raise ConfigError(f"channel count {c} is not a multiple of 32 (GroupNorm(32) needs it)")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ConfigError("exactly one of num_heads / num_head_channels must be set")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(m * self.model_channels for m in self.channel_mult)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a spatial transformer with `channels` channels (legacy=False rule)."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def encoder_plan(self) -> list[dict]:
        """The 12 input blocks of SD 1.5 (for channel_mult of length 4), in order.

        Each entry: kind ('conv' | 'res' | 'down'), in/out channels, whether an attention block
        follows, the level and (for 'res') the index inside the level.
        """
        plan = [dict(kind="conv", cin=self.in_channels, cout=self.model_channels, attn=False, level=0)]
        ch, ds = self.model_channels, 1
        for level, cout in enumerate(self.level_channels):
            for nr in range(self.num_res_blocks):
                plan.append(dict(kind="res", cin=ch, cout=cout, attn=ds in self.attention_resolutions,
                                 level=level, nr=nr))
                ch = cout
            if level != len(self.channel_mult) - 1:
                plan.append(dict(kind="down", cin=ch, cout=ch, attn=False, level=level))
                ds *= 2
        return plan

    def decoder_plan(self) -> list[dict]:
        """The output blocks: each takes the skip of the matching input block (popped in reverse)."""
        skips = [b["cout"] for b in self.encoder_plan()]
        plan = []
        ch = self.level_channels[-1]
        ds = 2 ** (len(self.channel_mult) - 1)
        for level in reversed(range(len(self.channel_mult))):
            cout = self.level_channels[level]
            for i in range(self.num_res_blocks + 1):
                plan.append(dict(cin=ch + skips.pop(), cout=cout, attn=ds in self.attention_resolutions,
                                 up=bool(level) and i == self.num_res_blocks, level=level))
                ch = cout
            ds //= 2
        return plan


@dataclasses.dataclass(frozen=True)
class LocalFuserConfig(UNetConfig):
    """The local fuser: a trainable copy of the UNet encoder driven by fg/bg depth features."""

    local_channels: int = 3
    inject_channels: tuple[int, ...] = (192, 256, 384, 512)
    inject_layers: tuple[int, ...] = (1, 4, 7, 10)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "inject_channels", _tuple(self.inject_channels))
        object.__setattr__(self, "inject_layers", _tuple(self.inject_layers))
        if len(self.inject_channels) != len(self.channel_mult):
            raise ConfigError("inject_channels needs one entry per UNet level")
        res_layers = {i for i, b in enumerate(self.encoder_plan()) if b["kind"] == "res"}
        if not set(self.inject_layers) <= res_layers:
            raise ConfigError(f"inject_layers {self.inject_layers} must name ResBlock input blocks {sorted(res_layers)}")


@dataclasses.dataclass(frozen=True)
class GlobalFuserConfig:
    """The global fuser MLP: CLIP image embedding -> channel_mult[-1] tokens per branch."""

    in_dim: int = 768
    channel_mult: tuple[int, int] = (2, 4)
    dropout1: float = 0.1
    dropout2: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult))
        if len(self.channel_mult) != 2:
            raise ConfigError("global fuser channel_mult must have two entries")

    @property
    def num_tokens(self) -> int:
        return self.channel_mult[-1]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """LDM AutoencoderKL (`ddconfig` + `embed_dim`)."""

    embed_dim: int = 4
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", _tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", _tuple(self.attn_resolutions) if self.attn_resolutions else ())

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (HF `CLIPTextConfig` fields); defaults = openai/clip-vit-large-patch14."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "text config") -> "TextEncoderConfig":
        d = d.get("text_config", d)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ConfigError(f"{source}: hidden_act {kwargs['hidden_act']!r} is not supported")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The HF `CLIPTextConfig` JSON of this tower (a CLIPTextModel folder's config.json; from_hf_dict reads it)."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The DDPM schedule and latent scaling of LatentDiffusion."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    beta_schedule: str = "linear"
    scale_factor: float = 0.18215
    parameterization: str = "eps"

    def __post_init__(self):
        if self.beta_schedule != "linear":
            raise ConfigError(f"beta_schedule {self.beta_schedule!r} is not supported (only 'linear')")
        if self.parameterization != "eps":
            raise ConfigError(f"parameterization {self.parameterization!r} is not supported (only 'eps')")


@dataclasses.dataclass(frozen=True)
class CnCConfig:
    """A whole CnC model: the mode decides which adapters exist.

    mode 'local'  : UNet + local fuser (depth residuals), text context only.
    mode 'global' : UNet + global fuser (4+4 image tokens, soft-guidance mask).
    mode 'cnc'    : both.
    mode 'sd'     : plain Stable Diffusion (no adapters), e.g. an SD-1.5 checkpoint.
    """

    mode: str = "cnc"
    unet: UNetConfig = UNetConfig()
    local_fuser: Optional[LocalFuserConfig] = None
    global_fuser: Optional[GlobalFuserConfig] = None
    vae: VAEConfig = VAEConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    latent_size: int = 64  # default latent side (image side / 8) used by samplers

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}")
        want_local, want_global = self.mode in ("local", "cnc"), self.mode in ("global", "cnc")
        if want_local != (self.local_fuser is not None):
            raise ConfigError(f"mode {self.mode!r} {'needs' if want_local else 'has no'} a local fuser")
        if want_global != (self.global_fuser is not None):
            raise ConfigError(f"mode {self.mode!r} {'needs' if want_global else 'has no'} a global fuser")
        if self.global_fuser is not None and self.global_fuser.in_dim != self.unet.context_dim:
            raise ConfigError("global fuser in_dim must equal the UNet context_dim (tokens join the text context)")

    @property
    def has_local(self) -> bool:
        return self.local_fuser is not None

    @property
    def has_global(self) -> bool:
        return self.global_fuser is not None

    # ---- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "CnCConfig":
        try:
            return cls(
                mode=d["mode"],
                unet=UNetConfig(**d["unet"]),
                local_fuser=LocalFuserConfig(**d["local_fuser"]) if d.get("local_fuser") else None,
                global_fuser=GlobalFuserConfig(**d["global_fuser"]) if d.get("global_fuser") else None,
                vae=VAEConfig(**d["vae"]),
                text_encoder=TextEncoderConfig(**d["text_encoder"]),
                diffusion=DiffusionConfig(**d["diffusion"]),
                latent_size=d.get("latent_size", 64),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: not a cnc_jax model config ({e})") from None


# ---- presets (the official YAMLs: configs/cnc_v1.yaml, local_fuser_v1.yaml, global_fuser_v1.yaml) ----

def _unet_fields(c: UNetConfig) -> dict:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(UNetConfig)}


def sd15() -> CnCConfig:
    return CnCConfig(mode="sd")


def local_fuser_v1() -> CnCConfig:
    unet = UNetConfig()
    return CnCConfig(mode="local", unet=unet, local_fuser=LocalFuserConfig(**_unet_fields(unet)))


def global_fuser_v1() -> CnCConfig:
    return CnCConfig(mode="global", global_fuser=GlobalFuserConfig())


def cnc_v1() -> CnCConfig:
    unet = UNetConfig()
    return CnCConfig(mode="cnc", unet=unet, local_fuser=LocalFuserConfig(**_unet_fields(unet)),
                     global_fuser=GlobalFuserConfig())


def tiny() -> CnCConfig:
    """A small mode-'cnc' model for smoke tests and `sample.py --random-init` (random weights only).

    2 UNet levels with attention in both, a byte-level tokenizer's 514 ids, a 3-level VAE (factor 8).
    """
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      num_heads=2, context_dim=32)
    return CnCConfig(
        mode="cnc", unet=unet,
        local_fuser=LocalFuserConfig(**_unet_fields(unet), inject_channels=(16, 32), inject_layers=(1, 3)),
        global_fuser=GlobalFuserConfig(in_dim=32),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=128),
        text_encoder=TextEncoderConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, bos_token_id=512, eos_token_id=513, pad_token_id=513),
        latent_size=16)


PRESETS = {"cnc_v1": cnc_v1, "local_fuser_v1": local_fuser_v1, "global_fuser_v1": global_fuser_v1, "sd15": sd15,
           "tiny": tiny}


# ---- official YAML: one table, read by config_from_official_params and written by official_yaml -------------
# Each row pairs a place in the official model YAML (configs/*.yaml) with a CnCConfig field; both directions come
# from these rows. The official classes take our field names as keywords, so a section lists each name once.

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"  # the tower the official FrozenCLIPEmbedder loads (its default)
TEXT_CONFIG_SUFFIX = "_clip_text_config.json"  # <YAML stem> + this: the CLIP text config of a YAML's tower


def _field_names(cls, without=()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in without)


# model.params.<key> <-> CnCConfig.<part>.<field> (part None: a field of CnCConfig itself)
_YAML_MODEL_PARAMS = (("linear_start", "diffusion", "linear_start"), ("linear_end", "diffusion", "linear_end"),
                      ("timesteps", "diffusion", "timesteps"), ("beta_schedule", "diffusion", "beta_schedule"),
                      ("parameterization", "diffusion", "parameterization"), ("image_size", None, "latent_size"),
                      ("scale_factor", "diffusion", "scale_factor"))
# model.params.<section>.params.<key> <-> CnCConfig.<part>.<key>, the UNet first (the local fuser defaults to it)
_YAML_SECTIONS = (
    ("unet_config", "unet", _field_names(UNetConfig)),
    # the official LocalFuser takes no out_channels (it has no decoder): ours follows the UNet's, as in the presets
    ("local_control_config", "local_fuser", _field_names(LocalFuserConfig, without=("out_channels",))),
    # the official GlobalFuser hard-codes its dropouts (0.1, 0.3): dropout1 / dropout2 have no key
    ("global_control_config", "global_fuser", ("in_dim", "channel_mult")),
)
_SECTION_MODES = {"unet": MODES, "local_fuser": ("local", "cnc"), "global_fuser": ("global", "cnc")}
# first_stage_config.params.<key> and first_stage_config.params.ddconfig.<key> <-> VAEConfig.<key>
_YAML_VAE_PARAMS = ("embed_dim",)
_YAML_VAE_DDCONFIG = _field_names(VAEConfig, without=_YAML_VAE_PARAMS)

# The official classes each YAML section instantiates, per mode (configs/{cnc_v1,local_fuser_v1,global_fuser_v1}.yaml;
# mode 'sd' is plain ldm: the official CnC asserts mode in local / global / cnc).
_OFFICIAL_TARGETS = {
    "cnc": {"model": "models.cnc.CnC", "unet_config": "models.local_global_fuser.CnCUNetModel",
            "local_control_config": "models.local_global_fuser.LocalFuser",
            "global_control_config": "models.local_global_fuser.GlobalFuser"},
    "local": {"model": "models.cnc.CnC", "unet_config": "models.local_fuser.LocalControlUNetModel",
              "local_control_config": "models.local_fuser.LocalFuser"},
    "global": {"model": "models.cnc.CnC", "unet_config": "models.global_fuser.GlobalControlUNetModel",
               "global_control_config": "models.global_fuser.GlobalFuser"},
    "sd": {"model": "ldm.models.diffusion.ddpm.LatentDiffusion",
           "unet_config": "ldm.modules.diffusionmodules.openaimodel.UNetModel"},
}
# Written as the official YAMLs have them; no architecture in them (training / logging switches), so not read.
_YAML_MODEL_CONSTANTS = {"num_timesteps_cond": 1, "log_every_t": 200, "first_stage_key": "jpg", "cond_stage_key": "txt",
                         "cond_stage_trainable": False, "conditioning_key": "crossattn",
                         "monitor": "val/loss_simple_ema", "use_ema": False}
# Official UNet keys that do not change the architecture (or must keep their SD-1.5 value).
_IGNORED_UNET_KEYS = {"image_size", "use_checkpoint", "use_spatial_transformer", "use_fp16", "out_channels"}
_FIXED_UNET_KEYS = {"legacy": False, "dropout": 0, "dims": 2, "conv_resample": True, "use_scale_shift_norm": False,
                    "resblock_updown": False, "num_heads_upsample": -1, "use_new_attention_order": False,
                    "disable_self_attentions": None, "num_attention_blocks": None,
                    "disable_middle_self_attn": False, "n_embed": None, "num_classes": None}
# UNet keys written beside the table's: the official defaults differ (legacy=True, use_spatial_transformer=False)
_UNET_WRITTEN = {"use_checkpoint": True, "use_spatial_transformer": True, "legacy": _FIXED_UNET_KEYS["legacy"]}


def _yaml_value(value):
    """Tuples as lists (YAML sequences, as the official files write them)."""
    return list(value) if isinstance(value, tuple) else value


def official_yaml(config: CnCConfig) -> dict:
    """The official model YAML document of `config` ({"model": {"target", "params"}}), from the table the reader
    reads; its text tower is CLIP ViT-L/14 (named) or the one in text_config_path(<the YAML>)."""
    targets = _OFFICIAL_TARGETS[config.mode]
    params = {key: _yaml_value(getattr(getattr(config, part) if part else config, name))
              for key, part, name in _YAML_MODEL_PARAMS}
    params.update(_YAML_MODEL_CONSTANTS, channels=config.vae.embed_dim)  # DDPM.channels: the latent's
    if config.mode != "sd":
        params["mode"] = config.mode
    for section, part, names in _YAML_SECTIONS:
        sub = getattr(config, part)
        if sub is None:
            continue
        values = {key: _yaml_value(getattr(sub, key)) for key in names}
        if part == "unet":  # UNetModel's image_size argument (unused by the model): the latent side
            values = {"image_size": config.latent_size, **values}
        if part != "global_fuser":
            values.update(_UNET_WRITTEN)
        params[section] = {"target": targets[section], "params": values}
    vae = config.vae
    params["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        **{key: getattr(vae, key) for key in _YAML_VAE_PARAMS}, "monitor": "val/rec_loss",
        "ddconfig": {**{key: _yaml_value(getattr(vae, key)) for key in _YAML_VAE_DDCONFIG}, "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}
    cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    if config.text_encoder == TextEncoderConfig():
        cond["params"] = {"version": CLIP_VIT_L14}
    params["cond_stage_config"] = cond
    return {"model": {"target": targets["model"], "params": params}}


def _unet_from_params(params: dict, where: str, names: tuple[str, ...], cls=UNetConfig, **defaults):
    kwargs = dict(defaults)
    for key, value in params.items():
        if key in names:
            kwargs[key] = value
        elif key in _FIXED_UNET_KEYS:
            if value != _FIXED_UNET_KEYS[key]:
                raise ConfigError(f"{where}.{key}={value!r} is not supported "
                                  f"(cnc_jax implements {_FIXED_UNET_KEYS[key]!r})")
        elif key not in _IGNORED_UNET_KEYS:
            raise ConfigError(f"{where}.{key} is not a known UNet parameter")
    if params.get("use_spatial_transformer") is False:
        raise ConfigError(f"{where}.use_spatial_transformer=False is not supported")
    try:
        return cls(**kwargs)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


def text_config_path(yaml_path: str) -> str:
    """The CLIP text config beside an official YAML that describes its tower (written by an official export for a
    tower other than ViT-L/14; read back first among the YAML's neighbours)."""
    return os.path.splitext(yaml_path)[0] + TEXT_CONFIG_SUFFIX


def _text_config_for_yaml(path: str, cond_params: dict, text_config: Optional[str]) -> TextEncoderConfig:
    """The CLIP text tower of an official YAML.

    The official FrozenCLIPEmbedder loads `openai/clip-vit-large-patch14` by name, so a YAML alone says
    nothing about other towers. In order: an explicit `text_config` (HF config.json or folder), the
    YAML's `cond_stage_config.params.version` if it is a local folder/JSON, ViT-L/14 if that version names it,
    text_config_path(path), a single `*clip_text_config.json` next to the YAML, else ViT-L/14.
    """
    version = cond_params.get("version")
    candidates = [text_config, version]
    if version != CLIP_VIT_L14:
        siblings = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*" + TEXT_CONFIG_SUFFIX)))
        candidates.append(text_config_path(path))
        if len(siblings) == 1:
            candidates.append(siblings[0])
    for cand in candidates:
        if not cand:
            continue
        cand = os.path.join(cand, "config.json") if os.path.isdir(cand) else cand
        if os.path.isfile(cand):
            return load_text_config(cand)
        if cand is text_config:
            raise ConfigError(f"text config {text_config}: no such file or folder")
    return TextEncoderConfig()


def load_text_config(path: str) -> TextEncoderConfig:
    try:
        with open(path) as f:
            return TextEncoderConfig.from_hf_dict(json.load(f), source=path)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read CLIP text config ({e})") from None


def config_from_official_yaml(path: str, text_config: Optional[str] = None) -> CnCConfig:
    """Build a CnCConfig from an official Compose-and-Conquer model YAML (configs/*.yaml)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        params = doc["model"]["params"]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML ({e})") from None
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: not an official model YAML (no model.params)") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: not an official model YAML (model.params is not a mapping)")
    cond = params.get("cond_stage_config") or {}
    cond_params = cond.get("params") if isinstance(cond, dict) else None
    text = _text_config_for_yaml(path, cond_params if isinstance(cond_params, dict) else {}, text_config)
    return config_from_official_params(params, text, where=path)


def config_from_official_params(params: dict, text_encoder: TextEncoderConfig, where: str = "official YAML"
                                ) -> CnCConfig:
    """The CnCConfig of an official YAML's model.params, its CLIP text tower given (official_yaml's inverse)."""

    def section(name: str) -> dict:
        sec = params.get(name)
        if not isinstance(sec, dict) or not isinstance(sec.get("params", {}), dict):
            raise ConfigError(f"{where}: model.params.{name} is missing or malformed")
        return sec.get("params") or {}

    mode = params.get("mode", "sd")
    parts = {}
    for name, part, names in _YAML_SECTIONS:
        if mode not in _SECTION_MODES[part]:
            continue
        values = section(name)
        if part == "global_fuser":
            unknown = set(values) - set(names)
            if unknown:
                raise ConfigError(f"{where}: {name}.params has unknown keys {sorted(unknown)}")
            try:
                parts[part] = GlobalFuserConfig(**values)
            except ConfigError as e:
                raise ConfigError(f"{where}: {name}.params: {e}") from None
        elif part == "local_fuser":
            parts[part] = _unet_from_params(values, f"{where}: {name}.params", names, LocalFuserConfig,
                                            out_channels=parts["unet"].out_channels)
        else:
            parts[part] = _unet_from_params(values, f"{where}: {name}.params", names)
    first = section("first_stage_config")
    dd = dict(first.get("ddconfig") or {})
    if dd.pop("dropout", 0.0):
        raise ConfigError(f"{where}: first_stage_config ddconfig.dropout must be 0")
    unknown = set(dd) - set(_YAML_VAE_DDCONFIG)
    if unknown:
        raise ConfigError(f"{where}: first_stage_config.params.ddconfig has unknown keys {sorted(unknown)}")
    model = {name: params[key] for key, part, name in _YAML_MODEL_PARAMS if part is None and key in params}
    diffusion = {name: params[key] for key, part, name in _YAML_MODEL_PARAMS if part == "diffusion" and key in params}
    try:
        vae = VAEConfig(**{key: first[key] for key in _YAML_VAE_PARAMS if key in first}, **dd)
        return CnCConfig(mode=mode, vae=vae, text_encoder=text_encoder, diffusion=DiffusionConfig(**diffusion),
                         **parts, **model)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _refuse_python_config(path: str) -> None:
    """A model config is data; a .py file is a training config (train.py --config), never run to read a model."""
    stem = os.path.splitext(os.path.basename(path))[0]
    hint = f" give the preset {stem!r}," if stem in PRESETS else " give a preset name,"
    raise ConfigError(f"{path}: a Python file is a training config (train.py --config), not a model config:{hint} "
                      "an official YAML or a cnc_jax config.json (or its folder)")


def load_config(spec: str, text_config: Optional[str] = None) -> CnCConfig:
    """A preset name, an official YAML or a cnc_jax JSON (e.g. a converted checkpoint's config.json or its
    folder). Python files are refused, not executed (training configs are read by train.py alone)."""
    spec = str(spec)
    if spec.endswith(".py"):
        _refuse_python_config(spec)
    if spec in PRESETS:
        cfg = PRESETS[spec]()
        if text_config:
            cfg = dataclasses.replace(cfg, text_encoder=load_text_config(text_config))
        return cfg
    if not os.path.exists(spec):
        raise ConfigError(f"config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    if os.path.isdir(spec):
        spec = os.path.join(spec, "config.json")
    if spec.endswith((".yaml", ".yml")):
        return config_from_official_yaml(spec, text_config)
    try:
        with open(spec) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{spec}: cannot read config JSON ({e})") from None
    return CnCConfig.from_dict(d.get("model", d), source=spec)
