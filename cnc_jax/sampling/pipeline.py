"""The sampling pipeline: jobs -> conditions (annotators or precomputed files) -> batched, sharded sampler -> images.

Conditions follow the official demo (src/test/test_cnc.py): user images are resized to the output size
(cv2-style bilinear); a missing fg/bg image gives a zero depth map, a missing embedding image a zero
embedding; the mask comes from the fg image, else the fg-embedding image, else a black image; the fg depth
is v1 / v2 / v3; depth controls scale then clip; global controls are the global_strength. Differences on
purpose: global_strength also applies at guidance scale 1, sizes may be non-square (multiples of 64), and a job
with neither a fg image nor a fg-embedding image, run without masker weights, gets an all-background (zero) mask
instead of U²-Net's map of a black image (which needs the weights: with --u2net the demo's mask is computed).

Images of equal (size, sampler, steps, eta, guidance on/off) are batched across jobs; each batch is sharded over
all local devices along the 'data' axis of sharding.make_mesh (with several processes, each samples its own jobs on its own devices).
Image i of a job draws its noise from fold_in(PRNGKey(seed), i) only, so
it does not depend on what else is in the batch or on the device count.

Non-finite numbers never become images: a precomputed file with NaN / Inf is refused by cnc_jax.io, a computed
condition or a sampled image that is not finite (NaN weights, a numerically broken sampler) fails its job, since
converting NaN to uint8 gives a black image that would look like a result.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnc_jax.annotators.images import demo_resize, to_unit
from cnc_jax.model_config import CnCConfig
from cnc_jax.io import InputError, read_embedding, read_map, read_rgb_image
from cnc_jax.models.resize import resize_bilinear
from cnc_jax.models.vae import AutoencoderKL
from cnc_jax.sampling.jobs import JobError, JobFault, JobSpec
from cnc_jax.sampling.guided import Conditions, sample_latents
from cnc_jax.sampling.samplers import get_sampler, sampler_arrays
from cnc_jax.sampling.demo_prompts import PROMPT_SUFFIX
from cnc_jax.text_encoder import TextEncoder
from cnc_jax.sharding import make_mesh


@dataclasses.dataclass
class Annotators:
    """What turns user images into conditions; any may be None if no job needs it."""

    embedder: Optional[Callable] = None  # CLIPImageEmbedder: list of uint8 images -> (B, C)
    masker: Optional[Callable] = None  # (images (B,H,W,3) [0,1], size) -> (B, H, W, 1)
    depth: Optional[Callable] = None  # DepthEstimator: (B,H,W,3) [0,1] -> (B,H,W,3)


@dataclasses.dataclass
class PreparedJob:
    spec: JobSpec
    conditions: dict  # numpy: fg_depth/bg_depth (H,W,3), mask (H,W,1), fg_emb/bg_emb (C,) (those the mode uses)
    text_context: np.ndarray  # (L, C)
    uncond_context: np.ndarray


class Pipeline:
    def __init__(self, config: CnCConfig, params: dict, text_encoder: TextEncoder, annotators: Annotators,
                 per_device_batch: int = 1, devices=None, dtype: str = "float32", attention: str = "xla"):
        self.config, self.text_encoder, self.annotators = config, text_encoder, annotators
        self.dtype, self.attention = dtype, attention
        self.mesh = make_mesh(devices=devices if devices is not None else jax.local_devices())
        replicated = NamedSharding(self.mesh, PartitionSpec())
        parts = [p for p in ("unet", "local_fuser", "global_fuser") if p in params]
        self.params = jax.device_put({p: params[p] for p in parts}, replicated)
        self.vae_params = jax.device_put(params["vae"], replicated)
        self.batch_size = per_device_batch * self.mesh.size
        vae = AutoencoderKL(config.vae)
        scale = config.diffusion.scale_factor
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / scale, method=AutoencoderKL.decode))

    # ---- conditions ----------------------------------------------------------------------------------
    def check(self, spec: JobSpec) -> None:
        """What can be known of a job before anything is read or sampled: its sampler's step grid for this model.
        Raises JobError naming the field."""
        try:
            get_sampler(spec.sampler).plan(self.config.diffusion, spec.steps, spec.eta)
        except ValueError as e:
            raise JobError(spec.line, "steps", str(e)) from None

    def prepare(self, spec: JobSpec) -> PreparedJob:
        """Read / annotate everything a job needs; raises JobError naming the field that failed."""
        cfg, hw = self.config, (spec.height, spec.width)
        self.check(spec)

        def image(field):
            path = getattr(spec, field)
            return None if path is None else read(field, lambda p: demo_resize(read_rgb_image(p), hw))

        def need(annotator, field, flag):
            if getattr(self.annotators, annotator) is None:
                raise JobError(spec.line, field, f"computing it needs {annotator} weights ({flag})")
            return getattr(self.annotators, annotator)

        def read(field, reader):
            path = getattr(spec, field)
            try:
                return reader(path)
            except InputError as e:
                raise JobError(spec.line, field, str(e)) from None
            except Exception as e:  # what the readers do not expect (a decoder's own error): this job only
                raise JobFault(spec.line, field, f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from e

        conditions = {}
        fg = image("fg_image")
        mask = None
        wants_mask = cfg.has_global or (cfg.has_local and fg is not None and spec.fg_depth is None
                                        and spec.depth_version != "v1")
        if wants_mask and spec.mask is not None:
            mask = self._fit(read("mask", lambda p: read_map(p, 1)), hw)
        elif wants_mask:  # the demo's mask anchor: fg image, else fg-embedding image, else a black image
            anchor = fg if fg is not None else image("fg_emb_image")
            if anchor is None and self.annotators.masker is None:  # nothing to take a mask from: all background
                mask = np.zeros(hw + (1,), np.float32)
            else:
                anchor = np.zeros(hw + (3,), np.uint8) if anchor is None else anchor
                field = "fg_image" if fg is not None else "fg_emb_image" if spec.fg_emb_image else "mask"
                mask = np.asarray(need("masker", field, "--u2net")(to_unit(anchor)[None], hw))[0]
        if cfg.has_global:
            conditions["mask"] = mask
            dim = cfg.global_fuser.in_dim
            for side in ("fg", "bg"):
                if getattr(spec, f"{side}_emb") is not None:
                    emb = read(f"{side}_emb", lambda p: read_embedding(p, dim))
                elif getattr(spec, f"{side}_emb_image") is not None:
                    emb = np.asarray(need("embedder", f"{side}_emb_image", "--clip-vision")(
                        [image(f"{side}_emb_image")]))[0]
                else:
                    emb = np.zeros((dim,), np.float32)
                conditions[f"{side}_emb"] = emb
        if cfg.has_local:
            conditions["fg_depth"] = self._fg_depth(spec, fg, mask, read, need)
            if spec.bg_depth is not None:
                bg_depth = self._fit(read("bg_depth", lambda p: read_map(p, 3)), hw)
            elif spec.bg_image is not None:
                bg_depth = np.asarray(need("depth", "bg_image", "--dpt")(to_unit(image("bg_image"))[None]))[0]
            else:
                bg_depth = np.zeros(hw + (3,), np.float32)
            conditions["bg_depth"] = np.clip(bg_depth * spec.bg_depth_control, 0.0, 1.0)
        prompt = spec.prompt + (PROMPT_SUFFIX if spec.prompt_suffix else "")
        contexts = self.text_encoder([prompt, spec.negative_prompt])
        conditions = {k: np.asarray(v, np.float32) for k, v in conditions.items()}
        computed = {**conditions, "text context": contexts[0], "negative text context": contexts[1]}
        for name, value in computed.items():
            if not np.isfinite(value).all():
                raise JobError(spec.line, None, f"the computed {name} is not finite (NaN or Inf): the annotator or "
                                                "text encoder weights are broken")
        return PreparedJob(spec, conditions, contexts[0], contexts[1])

    def _fg_depth(self, spec, fg, mask, read, need) -> np.ndarray:
        hw = (spec.height, spec.width)
        if spec.fg_depth is not None:
            depth = self._fit(read("fg_depth", lambda p: read_map(p, 3)), hw)
        elif fg is None:
            depth = np.zeros(hw + (3,), np.float32)
        else:
            estimator = need("depth", "fg_image", "--dpt")
            x = to_unit(fg)[None]
            if spec.depth_version == "v2":
                depth = np.asarray(estimator(x * mask[None]))[0]
            else:
                depth = np.asarray(estimator(x))[0]
                if spec.depth_version == "v3":
                    depth = depth * mask
        return np.clip(depth * spec.fg_depth_control, 0.0, 1.0)

    @staticmethod
    def _fit(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Precomputed maps of another size are resized (bilinear) to the output size."""
        if array.shape[:2] == hw:
            return array
        return np.asarray(resize_bilinear(jnp.asarray(array)[None], hw))[0]

    # ---- sampling ------------------------------------------------------------------------------------
    def generate(self, jobs: list[PreparedJob], on_images: Optional[Callable[[int], None]] = None) -> dict:
        """{job name: (num_images, H, W, 3) uint8, or the JobError of a job whose sampled images are not finite
        (never to be written)}. Images of compatible jobs share batches."""
        groups = defaultdict(list)
        for job in jobs:
            s = job.spec
            for i in range(s.num_images):
                groups[(s.height, s.width, s.sampler, s.steps, s.eta, s.guided)].append((job, i))
        results = {job.spec.name: [None] * job.spec.num_images for job in jobs}
        finite = {job.spec.name: [True] * job.spec.num_images for job in jobs}
        for (h, w, sampler, steps, eta, guided), items in groups.items():
            arrays = sampler_arrays(sampler, self.config.diffusion, steps, eta)
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                images, ok = self._run_batch(chunk + [chunk[0]] * (self.batch_size - len(chunk)), sampler, arrays,
                                             guided, (h, w))
                for (job, i), img, good in zip(chunk, images, ok):
                    results[job.spec.name][i], finite[job.spec.name][i] = img, bool(good)
                if on_images:
                    on_images(len(chunk))
        out = {}
        for job in jobs:
            bad = finite[job.spec.name].count(False)
            out[job.spec.name] = np.stack(results[job.spec.name]) if not bad else JobError(
                job.spec.line, None, f"images are not finite ({bad} of {job.spec.num_images} hold NaN or Inf: the "
                                     f"weights or the sampler ({job.spec.sampler}, {job.spec.steps} steps) broke down "
                                     "numerically); nothing written")
        return out

    def _run_batch(self, items, sampler: str, steps: dict, guided: bool,
                   hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images, whether each decoded image was finite before the conversion)."""
        def stack(get):
            return np.stack([get(job, i) for job, i in items])

        names = items[0][0].conditions.keys()
        cond = Conditions(
            text_context=stack(lambda j, i: j.text_context),
            uncond_context=stack(lambda j, i: j.uncond_context) if guided else None,
            **{k: stack(lambda j, i, k=k: j.conditions[k]) for k in names},
            global_strength=stack(lambda j, i: np.array([j.spec.fg_global_control, j.spec.bg_global_control],
                                                        np.float32)) if self.config.has_global else None)
        keys = stack(lambda j, i: np.asarray(jax.random.fold_in(jax.random.PRNGKey(j.spec.seed), i)))
        scale = stack(lambda j, i: np.float32(j.spec.cfg_scale))
        shard = NamedSharding(self.mesh, PartitionSpec("data"))
        cond, keys, scale = jax.device_put((cond, keys, scale), shard)
        latent_shape = (hw[0] // 8, hw[1] // 8, self.config.unet.in_channels)
        latents = sample_latents(self.config, self.params, cond, keys, steps, scale, use_guidance=guided,
                                 latent_shape=latent_shape, dtype=self.dtype, attention=self.attention,
                                 sampler=sampler)
        decoded = np.asarray(self._decode(self.vae_params, latents))
        finite = np.isfinite(decoded).all(axis=(1, 2, 3))
        with np.errstate(invalid="ignore"):  # non-finite images are reported by `finite`, not converted silently
            return (decoded * 127.5 + 127.5).clip(0, 255).astype(np.uint8), finite  # the demo's conversion
