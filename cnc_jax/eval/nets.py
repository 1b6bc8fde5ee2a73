"""The evaluation networks as jitted batch functions, data-parallel over all devices (cnc_jax.data_parallel).

Every function takes host arrays of any batch length, pads them to a fixed batch (one compiled program per
image size), splits the batch over the devices, and returns numpy rows for the real inputs only.
`random_nets()` gives tiny random-weight versions of all four (evaluate.py --random-init).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.annotators.clip_image import preprocess as clip_preprocess
from cnc_jax.annotators.depth import normalize_depth
from cnc_jax.data_parallel import DataParallel
from cnc_jax.eval import metrics
from cnc_jax.model_config import tiny
from cnc_jax.models import clip_model, dpt, inception, lpips
from cnc_jax.models.clip_model import CLIPTextModelWithProjection
from cnc_jax.models.clip_vision import CLIPVisionModelWithProjection
from cnc_jax.models.resize import bilinear_matrix
from cnc_jax.models.tiny_annotators import tiny_annotator_configs
from cnc_jax.text_encoder import byte_level_tokenizer


class _Batched:
    """fn(params, *arrays) jitted, with params replicated and arrays padded to `batch` and sharded."""

    def __init__(self, fn, params, parallel: DataParallel, batch: int):
        self.parallel = parallel
        self.batch = parallel.padded_size(batch)
        self.params = parallel.replicate(params)
        self._fn = jax.jit(fn)

    def __call__(self, *arrays):
        n = len(arrays[0])
        outs = []
        for start in range(0, n, self.batch):
            chunk = [np.asarray(a[start:start + self.batch]) for a in arrays]
            outs.append(self.parallel.map(lambda *xs: self._fn(self.params, *xs), *chunk, size=self.batch))
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)


def to_unit(images) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (torchvision's ToTensor); float images are taken as they are."""
    images = np.asarray(images)
    return images.astype(np.float32) if images.dtype != np.uint8 else images.astype(np.float32) / np.float32(255)


class InceptionFeatures:
    """Images of any sizes (a list of (H, W, 3) uint8, or [0, 1] floats) -> (pool3 (B, 2048), logits (B, 1008)) of
    pytorch-fid's network.

    Each image is resized to 299 on the host first, with the same torch bilinear weights the network applies
    (cnc_jax.models.resize), so a folder of mixed sizes (COCO) runs as one compiled program.
    """

    def __init__(self, config: inception.InceptionConfig, params, parallel: DataParallel, batch: int):
        self.config = config
        model = inception.FIDInceptionV3(config)
        self._run = _Batched(lambda p, x: model.apply({"params": p}, x), params, parallel, batch)

    def __call__(self, images):
        return self._run(np.stack([fid_resize(image, self.config.input_size) for image in images]))


def fid_resize(image, side: int) -> np.ndarray:
    """One (H, W, 3) image -> float32 (side, side, 3) in [0, 1]: F.interpolate(bilinear, align_corners=False)."""
    x = to_unit(image)
    h, w = x.shape[:2]
    if (h, w) == (side, side):
        return x
    rows = np.tensordot(bilinear_matrix(h, side), x, axes=(1, 0))
    return np.einsum("pw,owc->opc", bilinear_matrix(w, side), rows, optimize=True).astype(np.float32)


class LPIPSDistance:
    """uint8 image pairs (B, H, W, 3) -> LPIPS (B,) (images mapped to [-1, 1] as lpips expects)."""

    def __init__(self, config: lpips.LPIPSConfig, params, parallel: DataParallel, batch: int):
        model = lpips.LPIPS(config)
        self._run = _Batched(lambda p, a, b: model.apply({"params": p}, a * 2 - 1, b * 2 - 1), params, parallel,
                             batch)

    def __call__(self, a, b):
        return self._run(to_unit(a), to_unit(b))


class SSIM:
    """uint8 image pairs -> torchmetrics SSIM (B,) (data range 1)."""

    def __init__(self, parallel: DataParallel, batch: int):
        self._run = _Batched(lambda _, a, b: metrics.ssim(a, b), {}, parallel, batch)

    def __call__(self, a, b):
        return self._run(to_unit(a), to_unit(b))


class CLIPScorer:
    """(uint8 images, captions) -> 100 * cos per pair, as torchmetrics' CLIPScore with a CLIPModel.

    Images go through CLIPImageProcessor's steps (cnc_jax.annotators.clip_image.preprocess); captions are
    tokenised padded to max_position_embeddings and, as torchmetrics does, cut there (no truncation that would
    keep the end token).
    """

    def __init__(self, config: clip_model.CLIPConfig, params: dict, tokenizer, parallel: DataParallel, batch: int):
        if len(tokenizer) > config.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the CLIP text tower only "
                             f"{config.text.vocab_size}")
        self.config, self.tokenizer = config, tokenizer
        vision, text = CLIPVisionModelWithProjection(config.vision), CLIPTextModelWithProjection(config)

        def score(p, pixels, ids):
            image = vision.apply({"params": p["clip_vision"]}, pixels)[0]
            return metrics.clip_pair_scores(image, text.apply({"params": p["clip_text"]}, ids))

        self._run = _Batched(score, params, parallel, batch)

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        length = self.config.text.max_position_embeddings
        ids = self.tokenizer(list(captions), padding="max_length", max_length=length)["input_ids"]
        return np.asarray([row[:length] for row in ids], np.int32)

    def __call__(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
        size = self.config.vision.image_size
        pixels = clip_preprocess(list(images), size=size, crop_size=size)
        return self._run(pixels, self.tokenize(captions))


class DepthMaps:
    """uint8 images -> (B, H, W) DPT depth, min-max normalised PER IMAGE as the dataset's conditions are
    (cnc_jax.prep.steps primitives_step); H, W must be multiples of the patch size."""

    def __init__(self, config: dpt.DPTConfig, params, parallel: DataParallel, batch: int):
        self.config = config
        model = dpt.DPTForDepthEstimation(config, fusion_upsampling="midas")

        def depth(p, x):
            raw = model.apply({"params": p}, x).astype(jnp.float32)
            return jax.vmap(lambda r: normalize_depth(r[None])[0, ..., 0])(raw)

        self._run = _Batched(depth, params, parallel, batch)

    def __call__(self, images):
        h, w = np.shape(images)[1:3]
        patch = self.config.patch_size
        if h % patch or w % patch:
            raise ValueError(f"DPT needs sides that are multiples of {patch}, got {h}x{w}")
        return self._run(to_unit(images))


@dataclasses.dataclass
class EvalNets:
    """The networks one evaluation needs (None where a metric is not asked for) and what weights they are."""

    inception: Optional[tuple[Any, dict]] = None  # (config, params)
    lpips: Optional[tuple[Any, dict]] = None
    clip: Optional[tuple[Any, dict]] = None
    dpt: Optional[tuple[Any, dict]] = None
    tokenizer: Any = None
    weights: dict = dataclasses.field(default_factory=dict)


def _he_scaled(params: dict) -> dict:
    """Conv kernels drawn U(+-1/sqrt(fan_in)) (torch's default) scaled by sqrt(6) to He's variance 2/fan_in, so a
    random ~100-layer ReLU net keeps its activations (at torch's default they shrink ~6x per layer to 0)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(np.sqrt(6)) if path[-1].key == "kernel" and x.ndim == 4 else x, params)


def random_nets(networks: Sequence[str] = ("inception", "lpips", "clip", "dpt"), seed: int = 0) -> EvalNets:
    """Tiny random-weight networks (smoke runs; nothing downloaded): widths / 8, Inception at 75 px. Only the
    `networks` named are built."""
    nets = EvalNets(weights={name: f"random-init (seed {seed})" for name in networks})
    if "inception" in networks:
        config = inception.InceptionConfig(input_size=75, channel_divisor=8)
        nets.inception = config, _he_scaled(inception.init_params(config, seed))
    if "lpips" in networks:
        config = lpips.LPIPSConfig("alex", channel_divisor=8)
        nets.lpips = config, _he_scaled(lpips.init_params(config, seed + 1))
    if "clip" in networks:
        vision = tiny_annotator_configs()["clip_vision"]
        config = clip_model.CLIPConfig(vision=vision, text=tiny().text_encoder, projection_dim=vision.projection_dim)
        nets.clip, nets.tokenizer = (config, clip_model.init_params(config, seed + 2)), byte_level_tokenizer()
    if "dpt" in networks:
        config = tiny_annotator_configs()["dpt"]
        nets.dpt = config, dpt.init_params(config, seed + 4)
    return nets


__all__ = ["InceptionFeatures", "fid_resize", "LPIPSDistance", "SSIM", "CLIPScorer", "DepthMaps", "EvalNets", "random_nets",
           "to_unit"]
