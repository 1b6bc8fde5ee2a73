"""The diffusers names of the SD parts, as one table of (diffusers module, official module) pairs per config.

Beside names.py (official <-> ours): diffusers numbers blocks per level (down_blocks.L.resnets.J) where the LDM
code numbers them globally (input_blocks.K.0), so the table is instantiated from the UNet's block plan and the
VAE's levels; both directions (`to_official`, `to_diffusers`) read the same list of pairs. Below a listed module
the names are the same on both sides, except the renames in _RESNET / _VAE_ATTENTION.

Files (as diffusers / transformers write them):
  unet/diffusion_pytorch_model.safetensors, vae/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors
"""

from __future__ import annotations

import functools
from typing import Optional

from cnc_jax.model_config import CnCConfig, UNetConfig, VAEConfig

# diffusers part -> (our part, official prefix, weights file)
PARTS = {
    "unet": ("unet", "model.diffusion_model.", "diffusion_pytorch_model.safetensors"),
    "vae": ("vae", "first_stage_model.", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("text_encoder", "cond_stage_model.transformer.", "model.safetensors"),
}
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("conv_shortcut", "nin_shortcut"))
# diffusers' VAE attention is Linear (out, in) where the LDM one is a 1x1 conv (out, in, 1, 1)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
VAE_LINEAR_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def _with_subs(pairs, diffusers: str, official: str, subs) -> None:
    pairs.extend((f"{diffusers}.{d}", f"{official}.{o}") for d, o in subs)


def unet_pairs(cfg: UNetConfig) -> list[tuple[str, str]]:
    pairs = [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
             ("time_embedding.linear_2", "time_embed.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    for k, block in enumerate(cfg.encoder_plan()):
        level = block["level"]
        if block["kind"] == "res":
            _with_subs(pairs, f"down_blocks.{level}.resnets.{block['nr']}", f"input_blocks.{k}.0", _UNET_RESNET)
            if block["attn"]:
                pairs.append((f"down_blocks.{level}.attentions.{block['nr']}", f"input_blocks.{k}.1"))
        elif block["kind"] == "down":
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
    _with_subs(pairs, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    _with_subs(pairs, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    levels = len(cfg.channel_mult)
    for k, block in enumerate(cfg.decoder_plan()):
        up, j = levels - 1 - block["level"], k % (cfg.num_res_blocks + 1)
        _with_subs(pairs, f"up_blocks.{up}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET)
        if block["attn"]:
            pairs.append((f"up_blocks.{up}.attentions.{j}", f"output_blocks.{k}.1"))
        if block["up"]:
            pairs.append((f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{k}.{2 if block['attn'] else 1}.conv"))
    return pairs


def vae_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    levels = len(cfg.ch_mult)
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_norm_out", f"{side}.norm_out"),
                  (f"{side}.conv_out", f"{side}.conv_out")]
        _with_subs(pairs, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET)
        _with_subs(pairs, f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION)
        _with_subs(pairs, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            _with_subs(pairs, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        level = levels - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            _with_subs(pairs, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if level > 0:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return pairs


@functools.lru_cache(maxsize=16)
def _tables(config: CnCConfig, part: str) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers module: official module}, its inverse) of one part."""
    pairs = {"unet": lambda: unet_pairs(config.unet), "vae": lambda: vae_pairs(config.vae),
             "text_encoder": lambda: [("text_model", "text_model")]}[part]()
    forward = dict(pairs)
    backward = {o: d for d, o in pairs}
    if len(forward) != len(pairs) or len(backward) != len(pairs):
        raise AssertionError(f"the diffusers {part} table is not one-to-one")
    return forward, backward


def _translate(table: dict[str, str], name: str) -> Optional[str]:
    """Longest listed module prefix of a dotted key replaced by its counterpart."""
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is not None:
            return ".".join([hit] + parts[n:])
    return None


def to_official(config: CnCConfig, part: str, key: str) -> Optional[str]:
    """diffusers key of `part` ('unet', 'vae', 'text_encoder') -> official key; None if the table lacks it.

    Text encoder keys may lack `text_model.` (transformers >= 5 in memory)."""
    if part == "text_encoder" and not key.startswith("text_model."):
        key = "text_model." + key
    found = _translate(_tables(config, part)[0], key)
    return None if found is None else PARTS[part][1] + found


def to_diffusers(config: CnCConfig, part: str, official_key: str) -> Optional[str]:
    prefix = PARTS[part][1]
    if not official_key.startswith(prefix):
        return None
    return _translate(_tables(config, part)[1], official_key[len(prefix):])


def is_vae_linear(part: str, diffusers_key: str) -> bool:
    """A VAE attention projection: (out, in) in diffusers, (out, in, 1, 1) in the official checkpoint."""
    module = diffusers_key.rpartition(".")[0]
    return part == "vae" and diffusers_key.endswith(".weight") and ".attentions." in module and any(
        module.endswith("." + m) for m in VAE_LINEAR_MODULES)
