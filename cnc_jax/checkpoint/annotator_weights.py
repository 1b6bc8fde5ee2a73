"""Annotator weights (CLIP vision, U²-Net, DPT): detect them, read them, convert them by the name table.

Sources: transformers folders (config.json + model.safetensors | pytorch_model.bin | a sharded index) for
CLIP vision (a CLIPVisionModelWithProjection or a whole CLIPModel) and DPT; official `u2net.pth` /
`u2netp.pth` files (torch zip or legacy format); torch-hub MiDaS `dpt_large_384.pt`; or a folder we
converted before (config.json with our format tag).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from cnc_jax.checkpoint.convert import convert_state_dict
from cnc_jax.checkpoint.hf_folder import hf_folder_state_dict, read_json
from cnc_jax.checkpoint.kinds import ANNOTATOR_KINDS as KINDS
from cnc_jax.checkpoint.kinds import CONFIG_CLASSES
from cnc_jax.checkpoint.midas import MIDAS_DPT_LARGE, is_midas_state_dict, midas_to_hf
from cnc_jax.checkpoint.store import FORMAT, load_converted
from cnc_jax.model_config import ConfigError
from cnc_jax.models import clip_vision, dpt, u2net
from cnc_jax.torchfile.state_dict import CheckpointError, load_state_dict

_ABSTRACT = {"clip_vision": clip_vision.abstract_params, "u2net": u2net.abstract_params, "dpt": dpt.abstract_params}
_HF_MODEL_TYPES = {"clip_vision_model": "clip_vision", "clip": "clip_vision", "dpt": "dpt"}


def detect_kind(path: str, state_dict: Optional[dict] = None) -> Optional[str]:
    """'clip_vision' | 'u2net' | 'dpt' for an annotator source, None for anything else (e.g. a CnC checkpoint)."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            return None
        meta = read_json(config_path)
        return meta.get("kind") if meta.get("kind") in KINDS else _HF_MODEL_TYPES.get(meta.get("model_type"))
    keys = state_dict.keys() if state_dict is not None else load_state_dict(path).keys()
    if "stage1.rebnconv1.conv_s1.weight" in keys:
        return "u2net"
    if "pretrained.model.cls_token" in keys:
        return "dpt"  # torch-hub MiDaS layout
    return None


def load_official_annotator(path: str, kind: Optional[str] = None, config=None) -> tuple[str, Any, dict]:
    """(kind, config, {kind: params}) from an official / transformers source; nothing read twice."""
    path = os.fspath(path)
    state_dict = None if os.path.isdir(path) else load_state_dict(path)
    kind = kind or detect_kind(path, state_dict)
    if kind not in KINDS:
        raise CheckpointError("not a CLIP vision, U2-Net or DPT checkpoint", path)
    source = path
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if config is None:
            try:
                config = CONFIG_CLASSES[kind].from_hf_dict(read_json(config_path), config_path)
            except (ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"{config_path}: {e}") from None
        state_dict = hf_folder_state_dict(path)
    elif kind == "u2net":
        config = config or u2net.detect_config(state_dict)
    elif kind == "dpt":
        if not is_midas_state_dict(state_dict):
            raise CheckpointError("a DPT file must be a torch-hub MiDaS checkpoint; for transformers weights give the "
                                  "folder that holds config.json", path)
        config, state_dict = config or MIDAS_DPT_LARGE, midas_to_hf(state_dict, source=path)
    else:
        raise CheckpointError("CLIP vision weights come as a transformers folder (config.json + weights)", path)
    params, _ = convert_state_dict(state_dict, {kind: _ABSTRACT[kind](config)}, source=source)
    return kind, config, params


def load_annotator(path: str, kind: str, config=None) -> tuple[Any, dict]:
    """(config, params) of an annotator from a folder we converted, or from an official / transformers source
    (`config` overrides the source's own, e.g. for a MiDaS file)."""
    config_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config_path) and read_json(config_path).get("format") == FORMAT:
        if kind == "clip_vision" and read_json(config_path).get("kind") == "clip":  # a whole CLIPModel
            config, params = load_converted(path, kind="clip")
            return config.vision, params["clip_vision"]
        config, params = load_converted(path, kind=kind)
        return config, params[kind]
    found, config, params = load_official_annotator(path, config=config)
    if found != kind:
        raise CheckpointError(f"holds {found} weights, not {kind}", path)
    return config, params[kind]
