"""THE table from official PyTorch state-dict names to cnc_jax parameter paths (and back).

This is the only place that knows the official names. An official key is split into
(prefix -> our top-level part) and a module path that the ordered regex rules below rewrite into our
module path; the leaf `weight` becomes whichever of kernel / scale / embedding our tree has there.
Layout changes depend only on the leaf kind: conv kernels OIHW -> HWIO, dense kernels (out, in) -> (in, out).
The reverse direction (`official_keys`, `to_official`, used by export) is derived from these same rules.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Callable, Optional, Union

# Official key prefixes of each part (stripped before the rules apply; '' = the whole key). The CnC parts
# share one checkpoint; annotator parts come in files of their own. Longest prefixes first.
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("model.diffusion_model.",),
    "local_fuser": ("local_adapter.",),
    "global_fuser": ("global_adapter.",),
    "vae": ("first_stage_model.",),
    # transformers < 5 layout (the official env) first, then transformers >= 5
    "text_encoder": ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
    "clip_vision": ("",),  # HF CLIPVisionModelWithProjection (or a whole CLIPModel) folder
    "u2net": ("",),  # U2NET / U2NETP state dict
    "dpt": ("",),  # HF DPTForDepthEstimation folder
    # evaluation networks (cnc_jax.checkpoint.eval_net_weights)
    "fid_inception": ("",),  # pytorch-fid's pt_inception-2015-12-05 state dict
    "lpips": ("",),  # torchvision AlexNet / VGG16 `features.*` + the lpips package's `lin<k>.model.1.weight`
    "clip_text": ("",),  # the text tower of a HF CLIPModel folder
}
CNC_PARTS = ("unet", "local_fuser", "global_fuser", "vae", "text_encoder")

# Entries that are not weights of any part (diffusion-schedule buffers, CLIP's position_ids, the VAE's Identity
# loss, EMA copies, BatchNorm counters, the other tower of a whole CLIPModel). model_ema.* is used on request.
IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$"
    r"|^cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$"
    r"|^first_stage_model\.loss\."
    r"|^model_ema\."
)
PART_IGNORED: dict[str, re.Pattern] = {
    "clip_vision": re.compile(r"^text_model\.|^text_projection\.|^logit_scale$|embeddings\.position_ids$"),
    "u2net": re.compile(r"\.num_batches_tracked$"),
    "dpt": re.compile(r"^dpt\.layernorm\."),  # the ViT's final LayerNorm: DPTForDepthEstimation never uses it
    "fid_inception": re.compile(r"\.num_batches_tracked$|^AuxLogits\."),
    # lpips registers its heads twice (lin0..4 and the ModuleList lins.0..4); torchvision files add `classifier.*`
    "lpips": re.compile(r"^lins\.\d+\.|^classifier\."),
    "clip_text": re.compile(r"^vision_model\.|^visual_projection\.|^logit_scale$|embeddings\.position_ids$"),
}


def is_ignored(key: str, parts) -> bool:
    return bool(IGNORED.search(key)) or any(p in PART_IGNORED and PART_IGNORED[p].search(key) for p in parts)


Replacement = Union[str, Callable[[re.Match], str]]

# Rules per top-level part: (pattern, replacement) applied in order, each at most once, to the dotted
# module path that follows the prefix (the leaf name excluded).
_RES_BLOCK = (
    (r"\.in_layers\.0$", ".norm_in"),
    (r"\.in_layers\.2$", ".conv_in"),
    (r"\.emb_layers\.1$", ".emb_proj"),
    (r"\.out_layers\.0$", ".norm_out"),
    (r"\.out_layers\.3$", ".conv_out"),
    (r"\.skip_connection$", ".skip"),
)
_TRANSFORMER = (
    (r"\.transformer_blocks\.(\d+)\.", r".block_\1."),
    (r"\.to_out\.0$", ".to_out"),
    (r"\.ff\.net\.0\.proj$", ".ff.proj_in"),
    (r"\.ff\.net\.2$", ".ff.proj_out"),
)
_ENCODER = (
    (r"^time_embed\.0$", "time_embed.linear_1"),
    (r"^time_embed\.2$", "time_embed.linear_2"),
    (r"^input_blocks\.0\.0$", "conv_in"),
    (r"^input_blocks\.(\d+)\.0\.op$", r"input_\1_down"),
    (r"^input_blocks\.(\d+)\.0(?=\.|$)", r"input_\1_res"),
    (r"^input_blocks\.(\d+)\.1(?=\.|$)", r"input_\1_attn"),
    (r"^middle_block\.0(?=\.|$)", "middle_res_1"),
    (r"^middle_block\.1(?=\.|$)", "middle_attn"),
    (r"^middle_block\.2(?=\.|$)", "middle_res_2"),
)
UNET_RULES: tuple[tuple[str, Replacement], ...] = _ENCODER + (
    (r"^output_blocks\.(\d+)\.0(?=\.|$)", r"output_\1_res"),
    (r"^output_blocks\.(\d+)\.[12]\.conv$", r"output_\1_up"),
    (r"^output_blocks\.(\d+)\.1(?=\.|$)", r"output_\1_attn"),
    (r"^out\.0$", "norm_out"),
    (r"^out\.2$", "conv_out"),
) + _RES_BLOCK + _TRANSFORMER

LOCAL_FUSER_RULES: tuple[tuple[str, Replacement], ...] = _ENCODER + (
    (r"^zero_convs\.(\d+)\.0$", r"zero_conv_\1"),
    (r"^middle_block_out\.0$", "middle_zero_conv"),
    (r"^feature_extractor\.(fg|bg)_extractor\.(\d+)$", lambda m: f"feature_extractor.{m[1]}_conv_{int(m[2]) // 2}"),
    (r"^feature_extractor\.extractors\.(\d+)\.0$", r"feature_extractor.down_\1"),
    (r"^feature_extractor\.zero_convs\.(\d+)$", r"feature_extractor.zero_conv_\1"),
) + _RES_BLOCK + _TRANSFORMER

GLOBAL_FUSER_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"\.net\.0\.proj$", ".proj_in"),
    (r"\.net\.2$", ".proj_out"),
)

VAE_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^(encoder\.down|decoder\.up)\.(\d+)\.block\.(\d+)", lambda m: f"{m[1]}_{m[2]}_block_{m[3]}"),
    (r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)", lambda m: f"{m[1]}_{m[2]}_attn_{m[3]}"),
    (r"^encoder\.down\.(\d+)\.downsample\.conv$", r"encoder.down_\1_downsample"),
    (r"^decoder\.up\.(\d+)\.upsample\.conv$", r"decoder.up_\1_upsample"),
    (r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)", r"\1.mid_\2"),
)

TEXT_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^embeddings\.(token_embedding|position_embedding)$", r"\1"),
    (r"^encoder\.layers\.(\d+)\.", r"layers_\1."),
)

CLIP_VISION_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^vision_model\.embeddings(?=\.|$)", "embeddings"),
    (r"^vision_model\.encoder\.layers\.(\d+)", r"layers_\1"),
    (r"^vision_model\.(pre_layrnorm|post_layernorm)$", r"\1"),
)

U2NET_RULES: tuple[tuple[str, Replacement], ...] = ()  # our U2NET modules keep the official names

# HF DPTForDepthEstimation (cnc_jax.models.dpt): dpt.encoder.layer.3.intermediate.dense -> layers_3.fc1,
# neck.fusion_stage.layers.1.* -> neck.fusion_1.*, head.head.{0,2,4} -> head.conv_{1,2,3}.
DPT_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^dpt\.embeddings(?=\.|$)", "embeddings"),
    (r"\.patch_embeddings\.projection$", ".patch_embeddings"),
    (r"^dpt\.encoder\.layer\.(\d+)\.", r"layers_\1."),
    (r"\.attention\.attention\.(query|key|value)$", r".attention.\1"),
    (r"\.attention\.output\.dense$", ".attention.out"),
    (r"\.intermediate\.dense$", ".fc1"),
    (r"\.output\.dense$", ".fc2"),
    (r"^neck\.reassemble_stage\.readout_projects\.(\d+)\.0$", r"neck.readout_project_\1"),
    (r"^neck\.reassemble_stage\.layers\.(\d+)\.", r"neck.reassemble_\1."),
    (r"^neck\.convs\.(\d+)$", r"neck.conv_\1"),
    (r"^neck\.fusion_stage\.layers\.(\d+)\.", r"neck.fusion_\1."),
    (r"^head\.head\.(\d+)$", lambda m: f"head.conv_{int(m[1]) // 2 + 1}"),
)

FID_INCEPTION_RULES: tuple[tuple[str, Replacement], ...] = ()  # cnc_jax.models.inception keeps the official names

LPIPS_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^features\.(\d+)$", r"trunk.features_\1"),
    (r"^lin(\d+)\.model\.1$", r"lin\1"),
)

CLIP_TEXT_RULES: tuple[tuple[str, Replacement], ...] = (
    (r"^text_model\.embeddings\.(token_embedding|position_embedding)$", r"text_model.\1"),
    (r"^text_model\.encoder\.layers\.(\d+)\.", r"text_model.layers_\1."),
)

RULES = {
    "unet": UNET_RULES,
    "local_fuser": LOCAL_FUSER_RULES,
    "global_fuser": GLOBAL_FUSER_RULES,
    "vae": VAE_RULES,
    "text_encoder": TEXT_RULES,
    "clip_vision": CLIP_VISION_RULES,
    "u2net": U2NET_RULES,
    "dpt": DPT_RULES,
    "fid_inception": FID_INCEPTION_RULES,
    "lpips": LPIPS_RULES,
    "clip_text": CLIP_TEXT_RULES,
}

# Our leaf names for an official `weight`, by the kind of layer our tree has at that path.
WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# Other renamed leaves (BatchNorm statistics); every other leaf keeps its official name.
LEAF_NAMES = {"running_mean": "mean", "running_var": "var"}


def split_prefix(key: str, parts=CNC_PARTS) -> Optional[tuple[str, str]]:
    """('model.diffusion_model.out.2.weight') -> ('unet', 'out.2.weight'); None if no part of `parts` has it."""
    for part in parts:
        for prefix in PART_PREFIXES[part]:
            if key.startswith(prefix):
                return part, key[len(prefix):]
    return None


def module_path(part: str, official_module: str) -> tuple[str, ...]:
    """Our module path (inside `part`) for an official dotted module path."""
    path = official_module
    for pattern, repl in RULES[part]:
        path = re.sub(pattern, repl, path, count=1)
    return tuple(path.split("."))


def our_path(key: str, parts=CNC_PARTS) -> Optional[tuple[str, tuple[str, ...], str]]:
    """official key -> (part, module path, leaf name), or None for a key outside the given parts.

    The leaf is official except for LEAF_NAMES; `weight` is resolved against our tree by the converter.
    """
    split = split_prefix(key, parts)
    if split is None:
        return None
    part, rest = split
    module, _, leaf = rest.rpartition(".")
    return part, module_path(part, module) if module else (), LEAF_NAMES.get(leaf, leaf)


def _relayout(array, leaf: str, conv_axes: tuple[int, int, int, int]):
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(*conv_axes)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_ours(array, leaf: str):
    """Official layout -> ours for a leaf of the given kind (numpy in, numpy out): OIHW -> HWIO, (out, in) ->
    (in, out)."""
    return _relayout(array, leaf, (2, 3, 1, 0))


def ours_shape_to_official(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def ema_key(key: str) -> Optional[str]:
    """The LitEma buffer holding the EMA copy of a UNet weight (`model_ema.` + name without dots)."""
    if not key.startswith("model.diffusion_model."):
        return None
    return "model_ema." + key[len("model."):].replace(".", "")


# ---- the reverse direction (ours -> official), derived from the rules above ------------------------------
# Every rule is expanded into its finite set of (official fragment, our fragment) pairs by enumerating its groups
# (alternatives as written, numbers below _NUMBER_BOUND) and running the forward rule itself on each fragment.
_NUMBER_BOUND = 128
_OUR_LEAVES_TO_OFFICIAL = {**{leaf: "weight" for leaf in WEIGHT_LEAVES}, **{v: k for k, v in LEAF_NAMES.items()}}


def _pattern_pieces(pattern: str) -> tuple[bool, str, list[list[str]]]:
    """The restricted regex syntax of the rules -> (anchored at the start, end kind, list of option lists).

    End kind: '$' (end of path), '.' (end of path or a following dot) or '' (anywhere).
    """
    start = pattern.startswith("^")
    body = pattern[1:] if start else pattern
    end = ""
    if body.endswith("(?=\\.|$)"):
        body, end = body[: -len("(?=\\.|$)")], "."
    elif body.endswith("$"):
        body, end = body[:-1], "$"
    pieces, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if body[i + 1] != ".":
                raise ValueError(f"rule {pattern!r}: unsupported escape")
            pieces.append(["."])
            i += 2
        elif c == "(":
            close = body.index(")", i)
            inner = body[i + 1:close]
            if inner == "\\d+":
                options = [str(n) for n in range(_NUMBER_BOUND)]
            else:
                options = inner.replace("\\.", ".").split("|")
            if any(ch in o for o in options for ch in "()[]\\+*?"):
                raise ValueError(f"rule {pattern!r}: unsupported group {inner!r}")
            pieces.append(options)
            i = close + 1
        elif c == "[":
            close = body.index("]", i)
            pieces.append(list(body[i + 1:close]))
            i = close + 1
        elif c.isalnum() or c == "_":
            pieces.append([c])
            i += 1
        else:
            raise ValueError(f"rule {pattern!r}: unsupported syntax at {body[i:]!r}")
    return start, end, pieces


@functools.lru_cache(maxsize=None)
def _inverse_rule(part: str, index: int) -> tuple[bool, str, dict[str, list[str]], tuple[int, ...]]:
    """(start anchor, end kind, {our fragment: [official fragments]}, fragment lengths) of one rule."""
    pattern, repl = RULES[part][index]
    start, end, pieces = _pattern_pieces(pattern)
    table: dict[str, list[str]] = {}
    for combo in itertools.product(*pieces):
        official = "".join(combo)
        ours = re.sub(pattern, repl, official, count=1)
        table.setdefault(ours, []).append(official)
    return start, end, table, tuple(sorted({len(k) for k in table}))


def _boundary(text: str, begin: int, stop: int) -> bool:
    """A fragment at text[begin:stop] does not cut a name in the middle."""
    before_ok = begin == 0 or not (text[begin].isalnum() and text[begin - 1].isalnum())
    after_ok = stop == len(text) or not (text[stop - 1].isalnum() and text[stop].isalnum())
    return before_ok and after_ok


def _unapply(part: str, index: int, path: str) -> list[str]:
    """The official paths that rule `index` maps onto `path` (just [path] where it does not apply)."""
    start, end, table, lengths = _inverse_rule(part, index)
    for begin in [0] if start else range(len(path)):
        for length in lengths:
            stop = begin + length
            if stop > len(path) or (end == "$" and stop != len(path)) or (
                    end == "." and stop != len(path) and path[stop] != "."):
                continue
            found = table.get(path[begin:stop])
            if found and _boundary(path, begin, stop):
                return [path[:begin] + f + path[stop:] for f in found]
    return [path]


def official_module_candidates(part: str, module: tuple[str, ...]) -> list[str]:
    """Official dotted module paths whose forward mapping is our `module` (more than one where a rule merges
    several official names, e.g. the upsampler of an output block at index 1 or 2)."""
    paths = [".".join(module)]
    for index in reversed(range(len(RULES[part]))):
        paths = [q for p in paths for q in _unapply(part, index, p)]
    return [p for p in dict.fromkeys(paths) if module_path(part, p) == tuple(module)]


def official_keys(flat_paths) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """{our full path (part, ..., leaf): official key} for our leaves, and the paths that have none.

    Where several official names map onto one of ours, the one that shares the fewest module prefixes with the
    other leaves' official names is taken (the free index next to its siblings).
    """
    candidates, unmapped = {}, []
    for path in flat_paths:
        part, module, leaf = path[0], tuple(path[1:-1]), path[-1]
        found = official_module_candidates(part, module) if module else [""]
        if not found:
            unmapped.append("/".join(path))
            continue
        leaf_name = _OUR_LEAVES_TO_OFFICIAL.get(leaf, leaf)
        prefix = PART_PREFIXES[part][0]  # the official environment's layout (transformers < 5 for the text tower)
        candidates[path] = [prefix + (m + "." if m else "") + leaf_name for m in found]
    taken = {c[0].rpartition(".")[0] for c in candidates.values() if len(c) == 1}
    prefixes = {".".join(m.split(".")[:n]) for m in taken for n in range(1, m.count(".") + 1)}

    def shared(key: str) -> int:
        module = key.rpartition(".")[0].split(".")
        return sum(".".join(module[:n]) in prefixes for n in range(1, len(module) + 1))

    return {path: min(c, key=shared) for path, c in candidates.items()}, unmapped


def to_official(array, leaf: str):
    """Our layout -> official for a leaf of the given kind (inverse of `to_ours`)."""
    return _relayout(array, leaf, (3, 2, 0, 1))
