"""torch-hub MiDaS DPT state dicts (e.g. `dpt_large_384.pt`, what the official GetDepthMap loads) -> HF
DPTForDepthEstimation names, so that `names.DPT_RULES` and the converter handle them like an Intel/dpt-large folder.

MiDaS (isl-org/MiDaS, `DPTDepthModel(backbone="vitl16_384")`) and HF name the same tensors differently:

  pretrained.model.cls_token / pos_embed            dpt.embeddings.cls_token / position_embeddings
  pretrained.model.patch_embed.proj.*               dpt.embeddings.patch_embeddings.projection.*
  pretrained.model.blocks.{i}.norm1 / norm2         dpt.encoder.layer.{i}.layernorm_before / layernorm_after
  pretrained.model.blocks.{i}.attn.qkv.*  (FUSED)   ...attention.attention.{query,key,value}.*  (split in 3 rows)
  pretrained.model.blocks.{i}.attn.proj.*           ...attention.output.dense.*
  pretrained.model.blocks.{i}.mlp.fc1 / fc2         ...intermediate.dense / output.dense
  pretrained.model.norm.*                           dpt.layernorm.*  (unused for depth; ignored by the converter)
  pretrained.model.head.*                           dropped (timm's ImageNet classifier, unused)
  pretrained.act_postprocess{n}.0.project.0.*       neck.reassemble_stage.readout_projects.{n-1}.0.*
  pretrained.act_postprocess{n}.3.* / .4.*          neck.reassemble_stage.layers.{n-1}.projection.* / .resize.*
  scratch.layer{n}_rn.*                             neck.convs.{n-1}.*
  scratch.refinenet{n}.out_conv.*                   neck.fusion_stage.layers.{N-n}.projection.*  (N = 4 stages)
  scratch.refinenet{n}.resConfUnit{k}.conv{j}.*     neck.fusion_stage.layers.{N-n}.residual_layer{k}.convolution{j}.*
  scratch.output_conv.{0,2,4}.*                     head.head.{0,2,4}.*

Differences of the MiDaS model itself (not of the names): timm's ViT LayerNorms use eps 1e-6 (the HF port
says 1e-12) — `MIDAS_DPT_LARGE` is Intel/dpt-large's config with eps 1e-6; and MiDaS v3.1 upsamples each
fusion output to the next skip's size instead of by 2 then resizing the skip, which differs only for odd
patch grids (input sides that are odd multiples of 16).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from cnc_jax.models.dpt import DPTConfig

MIDAS_DPT_LARGE = DPTConfig(layer_norm_eps=1e-6)


class RowSlice:
    """Rows [start, stop) of a (lazy) tensor along axis 0: `.shape` now, `.numpy()` reads the parent then."""

    def __init__(self, parent: Any, start: int, stop: int):
        self.parent, self.start, self.stop = parent, start, stop
        self.shape = (stop - start,) + tuple(parent.shape[1:])
        self.dtype = getattr(parent, "dtype", None)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        array = self.parent.numpy() if hasattr(self.parent, "numpy") else np.asarray(self.parent)
        return np.ascontiguousarray(array[self.start:self.stop])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"RowSlice({self.parent!r}[{self.start}:{self.stop}])"


_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def is_midas_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("pretrained.model.", "scratch.")) for k in state_dict)


def midas_to_hf(state_dict: Mapping[str, Any], *, source: str = "MiDaS checkpoint",
                num_stages: Optional[int] = None) -> dict[str, Any]:
    """Rename a MiDaS DPT (ViT backbone) state dict to HF DPTForDepthEstimation keys, lazily.

    Fused qkv weights/biases become three `RowSlice`s (nothing is read until `.numpy()`). Keys this adapter
    does not know are kept unchanged, so the converter reports them as unexpected. `num_stages` (the number
    of `scratch.refinenet*` blocks) is inferred when None.
    """
    if num_stages is None:
        found = {int(m[1]) for k in state_dict if (m := re.match(r"scratch\.refinenet(\d+)\.", k))}
        num_stages = max(found) if found else 4
    out: dict[str, Any] = {}

    def put(key: str, value: Any, original: str) -> None:
        if key in out:
            raise ValueError(f"{source}: {original} and another entry both map to {key}")
        out[key] = value

    for key, value in state_dict.items():
        m = re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:
            rows = value.shape[0]
            if rows % 3:
                raise ValueError(f"{source}: {key} has {rows} rows, not 3 x hidden_size")
            d = rows // 3
            for j, name in enumerate(("query", "key", "value")):
                put(f"dpt.encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}", RowSlice(value, j * d, (j + 1) * d),
                    key)
            continue
        new = _rename(key, num_stages)
        if new == "":
            continue  # dropped
        put(new, value, key)
    return out


def _rename(key: str, num_stages: int) -> str:
    """HF key for a MiDaS key ('' = drop, the key itself = unknown)."""
    rules = (
        (r"pretrained\.model\.cls_token", lambda m: "dpt.embeddings.cls_token"),
        (r"pretrained\.model\.pos_embed", lambda m: "dpt.embeddings.position_embeddings"),
        (r"pretrained\.model\.patch_embed\.proj\.(\w+)",
         lambda m: f"dpt.embeddings.patch_embeddings.projection.{m[1]}"),
        (r"pretrained\.model\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(\w+)",
         lambda m: f"dpt.encoder.layer.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"),
        (r"pretrained\.model\.norm\.(\w+)", lambda m: f"dpt.layernorm.{m[1]}"),
        (r"pretrained\.model\.head\.(\w+)", lambda m: ""),
        (r"pretrained\.act_postprocess(\d+)\.0\.project\.0\.(\w+)",
         lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0.{m[2]}"),
        (r"pretrained\.act_postprocess(\d+)\.3\.(\w+)",
         lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection.{m[2]}"),
        (r"pretrained\.act_postprocess(\d+)\.4\.(\w+)",
         lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.resize.{m[2]}"),
        (r"scratch\.layer(\d+)_rn\.(\w+)", lambda m: f"neck.convs.{int(m[1]) - 1}.{m[2]}"),
        (r"scratch\.refinenet(\d+)\.out_conv\.(\w+)",
         lambda m: f"neck.fusion_stage.layers.{num_stages - int(m[1])}.projection.{m[2]}"),
        (r"scratch\.refinenet(\d+)\.resConfUnit(\d)\.conv(\d)\.(\w+)",
         lambda m: f"neck.fusion_stage.layers.{num_stages - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}.{m[4]}"),
        (r"scratch\.output_conv\.(\d+)\.(\w+)", lambda m: f"head.head.{m[1]}.{m[2]}"),
    )
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return repl(m)
    return key


__all__ = ["MIDAS_DPT_LARGE", "RowSlice", "is_midas_state_dict", "midas_to_hf"]
