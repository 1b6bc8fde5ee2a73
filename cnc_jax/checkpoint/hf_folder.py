"""transformers model folders (config.json + model.safetensors | pytorch_model.bin | a sharded index), read lazily
by the torch-file readers: the annotators' (CLIP vision, DPT) and evaluation networks' (CLIPModel) sources."""

from __future__ import annotations

import json
import os
from typing import Any

from cnc_jax.torchfile.errors import CheckpointError
from cnc_jax.torchfile.state_dict import load_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON ({e})", path) from None


def hf_folder_state_dict(folder: str) -> dict[str, Any]:
    """All weights of a transformers folder, lazily (one file, or the shards a *.index.json lists)."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return load_state_dict(os.path.join(folder, name))
    for name in INDEX_FILES:
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            state_dict = {}
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                state_dict.update(load_state_dict(os.path.join(folder, shard)))
            return state_dict
    raise CheckpointError(f"no weights ({', '.join(WEIGHT_FILES + INDEX_FILES)})", folder)
