"""The model files an official export carries beside its .ckpt, and what the official code cannot build.

  official_files          {path: bytes}: <stem>.yaml, the official model YAML the official code builds the model from
                          (cnc_jax.model_config.official_yaml, the reader's own table), and, for a text tower other
                          than CLIP ViT-L/14, <stem>_clip_text_config.json (HF CLIPTextConfig) that our reader
                          takes for that YAML
  official_build_problems what the official code (tomtom1103/compose-and-conquer at 7aac519) cannot build or run
                          of a config, or the YAML cannot carry; one line each, naming the field

The official constraints, with where they are written:
  models/local_global_fuser.py, models/local_fuser.py
    FeatureExtractor      extractors / zero_convs built from inject_channels[0] .. [3]: exactly 4 injection levels
    LocalFuser.__init__   LocalResBlock at input block `1 + 3*level + nr` when that is in inject_layers (two ResBlocks
                          and a downsample per level), taking inject_channels[level]; forward hands the k-th depth
                          feature (inject_channels[k] channels, level k's resolution) to the k-th inject layer
    MaskedCrossAttention  the soft-guidance mask covers exactly 77 text tokens and repeats over k=4 tokens per branch
    GlobalFuser           FeedForward dropouts hard-coded 0.1 / 0.3
  models/cnc.py
    CnC.__init__          local_control_scales = [1.0] * 13: at most 13 residuals reach the UNet
    CnC.apply_model       global tokens split as [:, :4] foreground / [:, 4:] background; the UNet and the local
                          fuser get the noisy latent alone (conditioning_key crossattn)
  ldm/modules/encoders/modules.py
    FrozenCLIPEmbedder    prompts padded to max_length=77 tokens (cnc_jax pads to max_position_embeddings); the
                          tower and tokenizer come from_pretrained(version): ViT-L/14 by name, another tower from a
                          folder the user makes (its config.json is the text config written here)
Checked once against that code (torch 1.13, outside the project): the YAMLs exported from the reference tiny models
(modes cnc, local, global; sd from their SD parts) and from one with num_res_blocks=1, inject_layers=[1] build, load
their .ckpt with strict=True and run apply_model; the tiny preset's YAML stops in FeatureExtractor (inject_channels[2]),
and inject_layers=[1, 3, 5, 7] with num_res_blocks=1 fails the strict load.
"""

from __future__ import annotations

import dataclasses
import json
import os

import yaml

from cnc_jax.model_config import (CnCConfig, ConfigError, TextEncoderConfig, config_from_official_params,
                                  official_yaml, text_config_path)

OFFICIAL_COMMIT = "7aac519"
INJECTION_LEVELS = 4  # FeatureExtractor: inject_channels[0..3]
LOCAL_CONTROLS = 13  # CnC.local_control_scales = [1.0] * 13
TEXT_TOKENS = 77  # FrozenCLIPEmbedder max_length; MaskedCrossAttention's base mask
GLOBAL_TOKENS = 4  # CnC.apply_model's [:, :4] / [:, 4:]; MaskedCrossAttention's repeat k=4
GLOBAL_DROPOUTS = (0.1, 0.3)  # GlobalFuser's ff1 / ff2 dropout


def yaml_path(ckpt_path: str) -> str:
    """The model YAML beside an official export: the .ckpt's name with .yaml for its extension."""
    return os.path.splitext(ckpt_path)[0] + ".yaml"


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow sequences: `channel_mult: [1, 2, 4, 4]`, as the official configs write them."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                               flow_style=True))


def official_files(ckpt_path: str, config: CnCConfig) -> dict[str, bytes]:
    """{path: content} of the YAML (and text config JSON) an official export writes beside `ckpt_path`."""
    path = yaml_path(ckpt_path)
    header = (f"# Official Compose-and-Conquer model config of {os.path.basename(ckpt_path)}, written by cnc_jax "
              "(convert_torch_weights.py export --format official).\n"
              "# The official code builds the model from it: create_model(this file), then "
              "load_state_dict(the .ckpt); training with it needs the official data: section added.\n")
    files = {path: (header + yaml.dump(official_yaml(config), Dumper=_Dumper, sort_keys=False)).encode()}
    if config.text_encoder != TextEncoderConfig():
        files[text_config_path(path)] = (json.dumps(config.text_encoder.to_hf_dict(), indent=2) + "\n").encode()
    return files


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def official_build_problems(config: CnCConfig) -> list[str]:
    """`field=value: why` for each thing of `config` the official code cannot build or run, or its YAML cannot
    carry (a field official_yaml has no key for). Empty for the official presets and the reference tiny YAMLs."""
    problems: list[tuple[str, object, str]] = []
    latent = config.vae.embed_dim
    fed = [("unet.in_channels", config.unet.in_channels), ("unet.out_channels", config.unet.out_channels)]
    if config.has_local:
        fed.append(("local_fuser.in_channels", config.local_fuser.in_channels))
    for field, channels in fed:
        if channels != latent:
            problems.append((field, channels, f"the official LatentDiffusion / CnC (conditioning_key crossattn) "
                                              f"gives its UNet and fuser the noisy latent alone, "
                                              f"{latent} channels (vae.embed_dim)"))
    text = config.text_encoder
    if text.max_position_embeddings != TEXT_TOKENS:
        why = f"the official FrozenCLIPEmbedder pads every prompt to {TEXT_TOKENS} tokens (max_length)"
        if config.has_global:
            why += f" and MaskedCrossAttention masks exactly {TEXT_TOKENS} text tokens"
        problems.append(("text_encoder.max_position_embeddings", text.max_position_embeddings, why))
    if config.has_local:
        local = config.local_fuser
        layers = list(local.inject_layers)
        if len(local.inject_channels) != INJECTION_LEVELS:
            problems.append(("local_fuser.inject_channels", list(local.inject_channels),
                             f"the official FeatureExtractor hard-codes {INJECTION_LEVELS} injection levels (its "
                             f"extractors and zero_convs read inject_channels[0] to [{INJECTION_LEVELS - 1}]), "
                             f"this model has {len(local.inject_channels)} (one per UNet level)"))
        plan = local.encoder_plan()
        built = [i for i, block in enumerate(plan)
                 if block["kind"] == "res" and 1 + 3 * block["level"] + block["nr"] in layers]
        if sorted(built) != sorted(set(layers)):
            problems.append(("local_fuser.inject_layers", layers,
                             "the official LocalFuser puts a LocalResBlock at input block 1 + 3*level + nr (two "
                             f"ResBlocks and a downsample per level), which for num_res_blocks={local.num_res_blocks} "
                             f"makes LocalResBlocks of blocks {built}, not of the inject layers"))
        elif any(plan[i]["level"] != k for k, i in enumerate(layers)):
            problems.append(("local_fuser.inject_layers", layers,
                             "the official LocalFuser hands its k-th depth feature (inject_channels[k] channels, level "
                             "k's resolution) to the k-th inject layer, so inject layer k must lie in level k"))
        if len(plan) + 1 > LOCAL_CONTROLS:
            problems.append(("local_fuser.num_res_blocks", local.num_res_blocks,
                             f"the local fuser gives {len(plan) + 1} residuals, the official CnC passes at most "
                             f"{LOCAL_CONTROLS} (local_control_scales = [1.0] * {LOCAL_CONTROLS})"))
    if config.has_global:
        glob = config.global_fuser
        if glob.num_tokens != GLOBAL_TOKENS:
            problems.append(("global_fuser.channel_mult", list(glob.channel_mult),
                             f"the official CnC splits the global tokens as [:, :{GLOBAL_TOKENS}] foreground / "
                             f"[:, {GLOBAL_TOKENS}:] background and MaskedCrossAttention repeats the mask over "
                             f"{GLOBAL_TOKENS} tokens a branch: channel_mult[-1] must be {GLOBAL_TOKENS}"))
        if (glob.dropout1, glob.dropout2) != GLOBAL_DROPOUTS:
            problems.append(("global_fuser.dropout1/dropout2", [glob.dropout1, glob.dropout2],
                             f"the official GlobalFuser hard-codes {GLOBAL_DROPOUTS[0]} / {GLOBAL_DROPOUTS[1]}"))
    named = {f"{part}.{name}" for field, _, _ in problems for part, _, names in [field.partition(".")]
             for name in names.split("/")}  # "global_fuser.dropout1/dropout2": both fields
    try:
        back = config_from_official_params(official_yaml(config)["model"]["params"], config.text_encoder,
                                           where="the official YAML of this model")
        ours, theirs = _flat(dataclasses.asdict(config)), _flat(dataclasses.asdict(back))
        problems += [(field, ours[field], f"the official YAML has no place for it (read back as {theirs.get(field)!r})")
                     for field in ours if ours[field] != theirs.get(field) and field not in named]
    except ConfigError as e:
        problems.append(("model", config.mode, f"its official YAML does not read back ({e})"))
    return [f"{field}={value!r}: {why}" for field, value, why in problems]
