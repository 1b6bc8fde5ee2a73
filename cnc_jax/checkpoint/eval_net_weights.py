"""Weights of the evaluation networks (FID Inception, LPIPS, CLIPModel): detect them, convert them by the name table.

Sources users have:
  fid_inception  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchmetrics / clean-fid use the same net)
  lpips          a torchvision trunk (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`, or only its `features.*`)
                 PLUS the lpips package's heads (`weights/v0.1/alex.pth` / `vgg.pth`): two files
  clip           a transformers CLIPModel folder (config.json with text_config + vision_config, and weights)
Converted folders (cnc_jax.checkpoint.store) hold {'fid_inception': ...}, {'lpips': ...} or
{'clip_vision': ..., 'clip_text': ...}; sample.py may use a 'clip' folder for its image embeddings too.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from cnc_jax.checkpoint.convert import convert_state_dict
from cnc_jax.checkpoint.hf_folder import hf_folder_state_dict, read_json
from cnc_jax.checkpoint.kinds import EVAL_KINDS
from cnc_jax.checkpoint.store import FORMAT, load_converted
from cnc_jax.model_config import ConfigError
from cnc_jax.models import clip_model, inception, lpips
from cnc_jax.torchfile.state_dict import CheckpointError, load_state_dict

_INCEPTION_KEY = "Mixed_7c.branch_pool.conv.weight"
_LPIPS_HEAD_KEY = "lin0.model.1.weight"
_TRUNK_KEY = "features.0.weight"
LPIPS_USAGE = ("convert TRUNK.pth --lpips-lin HEADS.pth "
               "(e.g. alexnet-owt-7be5be79.pth --lpips-lin weights/v0.1/alex.pth)")


def is_clip_model_folder(path: str) -> bool:
    """A transformers folder of a whole CLIPModel (both towers), not a CLIPVisionModel[WithProjection]."""
    config_path = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(config_path)):
        return False
    meta = read_json(config_path)
    return meta.get("model_type") == "clip" and isinstance(meta.get("text_config"), dict)


def detect_eval_kind(path: str, state_dict: Optional[dict] = None) -> Optional[str]:
    """'fid_inception' | 'lpips' | 'clip' for an evaluation-network source, None for anything else."""
    if os.path.isdir(path):
        return "clip" if is_clip_model_folder(path) else None
    keys = (state_dict if state_dict is not None else load_state_dict(path)).keys()
    if _INCEPTION_KEY in keys and "fc.weight" in keys:
        return "fid_inception"
    if _TRUNK_KEY in keys or _LPIPS_HEAD_KEY in keys:
        return "lpips"
    return None


def _inception(path: str, state_dict: dict):
    fc = state_dict.get("fc.weight")
    if fc is None or len(fc.shape) != 2:
        raise CheckpointError("an FID Inception file needs fc.weight (classes, 2048)", path)
    config = inception.InceptionConfig(num_classes=int(fc.shape[0]))
    params, _ = convert_state_dict(state_dict, {"fid_inception": inception.abstract_params(config)}, source=path)
    return config, params


def _lpips(path: str, state_dict: dict, heads_path: Optional[str]):
    if _TRUNK_KEY not in state_dict:
        raise CheckpointError(f"holds only LPIPS heads (lin*); give the torchvision trunk first: {LPIPS_USAGE}", path)
    merged = dict(state_dict)
    if heads_path is not None:
        heads = load_state_dict(heads_path)
        if _LPIPS_HEAD_KEY not in heads:
            raise CheckpointError(f"not an lpips heads file (no {_LPIPS_HEAD_KEY})", heads_path)
        merged.update(heads)
    elif _LPIPS_HEAD_KEY not in merged:
        raise CheckpointError(f"an LPIPS trunk without its heads: {LPIPS_USAGE}", path)
    first = merged[_TRUNK_KEY].shape[0]  # 64 in both real trunks; smaller in shrunk (random) ones
    try:
        config = lpips.LPIPSConfig(net="vgg" if "features.28.weight" in merged else "alex",
                                   channel_divisor=64 // first if first and 64 % first == 0 else 0)
    except ConfigError as e:
        raise CheckpointError(f"{_TRUNK_KEY} has {first} channels: not an AlexNet / VGG16 trunk ({e})", path) from None
    source = path if heads_path is None else f"{path} + {heads_path}"
    params, _ = convert_state_dict(merged, {"lpips": lpips.abstract_params(config)}, source=source)
    return config, params


def _clip(path: str):
    config_path = os.path.join(path, "config.json")
    try:
        config = clip_model.CLIPConfig.from_hf_dict(read_json(config_path), config_path)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config_path}: {e}") from None
    state_dict = hf_folder_state_dict(path)
    abstract = clip_model.abstract_params(config)
    params = {}
    for part in ("clip_vision", "clip_text"):  # one part at a time: each ignores the other tower's keys
        params.update(convert_state_dict(state_dict, {part: abstract[part]}, source=path)[0])
    return config, params


def load_official_eval_net(path: str, kind: Optional[str] = None, *, lpips_heads: Optional[str] = None,
                           state_dict: Optional[dict] = None) -> tuple[str, Any, dict]:
    """(kind, config, {part: params}) from an official source; `lpips_heads` = the lpips heads file."""
    path = os.fspath(path)
    if state_dict is None and not os.path.isdir(path):
        state_dict = load_state_dict(path)
    kind = kind or detect_eval_kind(path, state_dict)
    if kind == "clip" and os.path.isdir(path):
        config, params = _clip(path)
    elif kind == "fid_inception" and state_dict is not None:
        config, params = _inception(path, state_dict)
    elif kind == "lpips" and state_dict is not None:
        config, params = _lpips(path, state_dict, lpips_heads)
    else:
        raise CheckpointError("not an FID Inception, LPIPS or transformers CLIPModel source", path)
    if lpips_heads is not None and kind != "lpips":
        raise CheckpointError(f"--lpips-lin is only for an LPIPS trunk, this is {kind}", path)
    return kind, config, params


def load_eval_net(path: str, kind: str) -> tuple[Any, dict]:
    """(config, {part: params}) of an evaluation network from a folder we converted (or a CLIPModel folder /
    an FID Inception file directly)."""
    config_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config_path) and read_json(config_path).get("format") == FORMAT:
        return load_converted(path, kind=kind)
    if not os.path.exists(path):
        raise CheckpointError("no such file or folder", path)
    found, config, params = load_official_eval_net(path)
    if found != kind:
        raise CheckpointError(f"holds {found} weights, not {kind}", path)
    return config, params


__all__ = ["EVAL_KINDS", "detect_eval_kind", "load_official_eval_net", "load_eval_net", "is_clip_model_folder",
           "LPIPS_USAGE"]
