#!/usr/bin/env python
"""Time the OFFICIAL PyTorch Compose-and-Conquer code on CPU (side-by-side reference for bench/).

Imports the official modules from --official-dir (github.com/tomtom1103/compose-and-conquer,
commit 7aac51976be58f47eb0f5a422c89f070a18532bd); nothing of the official code is copied here.
It builds the full-size model from the official ``configs/cnc_v1.yaml`` with random weights and
no network (CLIP text encoder from a ViT-L/14 config, a file-free fake tokenizer) and times:

  sample  one guided DDIM step: ``models.ddim_hacked.DDIMSampler.p_sample_ddim`` with
          unconditional_guidance_scale 7.5 and the cond / un_cond dicts built as in the official
          ``src/test/test_cnc.py`` (gradio app): two batch-1 ``apply_model`` calls (cond, uncond).
  vae     ``model.decode_first_stage(z)`` for one latent (1, 4, size/8, size/8).
  train   ``model.training_step(batch, 0)`` + ``loss.backward()`` + ``opt.step()`` +
          ``opt.zero_grad()`` with sd_locked=True, learning_rate 1e-5 (``src/train/train.py``),
          opt = ``model.configure_optimizers()`` (AdamW over the local + global fuser), batch size 1
          shaped as ``src/train/dataset_full.CnCDataset_Full`` yields it.

torchvision, pytorch_lightning and open_clip are not needed: minimal stand-ins for the few names
the official code imports are written to a temporary folder put first on sys.path (SHIMS below).

Usage:
  /work/official/venv/bin/python tools/bench_official.py --official-dir /work/official/cnc \
      --what sample|vae|train --size 512 --repeats 3 [--threads 2] [--profile]

Prints exactly one JSON line on stdout:
  {"what", "size", "threads", "torch", "times_s", "median_s"}
Everything else (the official code's own prints, progress notes) goes to stderr.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

# --------------------------------------------------------------------------------------------
# Stand-ins for torchvision / pytorch_lightning / open_clip (only what the official import path
# and the timed calls use). Written to a temp dir at start-up.
# --------------------------------------------------------------------------------------------
SHIMS = {
    "torchvision/__init__.py": '''
"""Stand-in for torchvision (bench_official.py): only what CnC's model code touches."""
from . import transforms, utils
__version__ = "0.0-shim"
''',
    "torchvision/utils.py": '''
import math
import torch


def make_grid(tensor, nrow=8, padding=2, normalize=False, value_range=None, scale_each=False,
              pad_value=0.0, **kwargs):
    """Plain grid of a (B, C, H, W) tensor (only used by the official logging helpers)."""
    if isinstance(tensor, (list, tuple)):
        tensor = torch.stack(list(tensor), dim=0)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.size(1) == 1:
        tensor = torch.cat((tensor, tensor, tensor), 1)
    n = tensor.size(0)
    xmaps = min(nrow, n)
    ymaps = int(math.ceil(float(n) / xmaps))
    h, w = int(tensor.size(2) + padding), int(tensor.size(3) + padding)
    grid = tensor.new_full((tensor.size(1), h * ymaps + padding, w * xmaps + padding), pad_value)
    k = 0
    for y in range(ymaps):
        for x in range(xmaps):
            if k >= n:
                break
            grid[:, y * h + padding:(y + 1) * h, x * w + padding:(x + 1) * w] = tensor[k]
            k += 1
    return grid
''',
    "torchvision/transforms/__init__.py": '''
from . import functional
from . import transforms
from .functional import InterpolationMode
from .transforms import Compose, Resize, CenterCrop, ToTensor, Normalize, ToPILImage
''',
    "torchvision/transforms/functional.py": '''
"""Tensor-only torchvision.transforms.functional.resize, following torchvision 0.12 (the official
environment.yaml pins torchvision=0.12.0): short-edge rule for an int size, early return when the
short edge already matches, F.interpolate(align_corners=False) for bilinear/bicubic, no clamp for
float input. CnC's MaskedCrossAttention calls resize(mask_float, hw, BICUBIC, antialias=False)."""
import enum
import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _output_size(h, w, size, max_size=None):
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else size[0]
        short, long = (w, h) if w <= h else (h, w)
        if short == requested:
            return None
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return [new_h, new_w]
    return [int(size[0]), int(size[1])]


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=None):
    if not isinstance(img, torch.Tensor):
        raise TypeError("torchvision shim: resize supports tensors only")
    if isinstance(interpolation, InterpolationMode):
        interpolation = interpolation.value
    h, w = img.shape[-2:]
    out = _output_size(h, w, size, max_size)
    if out is None:
        return img
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    out_dtype = x.dtype
    if not x.is_floating_point():
        x = x.float()
    align = False if interpolation in ("bilinear", "bicubic") else None
    kw = {}
    if interpolation in ("bilinear", "bicubic"):
        kw["antialias"] = bool(antialias)
    x = F.interpolate(x, size=out, mode=interpolation, align_corners=align, **kw)
    if interpolation == "bicubic" and out_dtype == torch.uint8:
        x = x.clamp(0, 255)
    if out_dtype != x.dtype:
        x = x.round().to(out_dtype) if not out_dtype.is_floating_point else x.to(out_dtype)
    return x.squeeze(0) if squeeze else x
''',
    "torchvision/transforms/transforms.py": '''
import torch
from .functional import InterpolationMode, resize


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=None):
        self.size, self.interpolation, self.max_size, self.antialias = size, interpolation, max_size, antialias

    def __call__(self, img):
        return resize(img, self.size, self.interpolation, self.max_size, self.antialias)


class _Unsupported:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        raise NotImplementedError("torchvision shim: %s is not provided" % type(self).__name__)


class CenterCrop(_Unsupported):
    pass


class ToTensor(_Unsupported):
    pass


class Normalize(_Unsupported):
    pass


class ToPILImage(_Unsupported):
    pass
''',
    "pytorch_lightning/__init__.py": '''
"""Stand-in for pytorch_lightning (bench_official.py): LightningModule as a torch.nn.Module with the
few members LDM/CnC use (device, global_step, current_epoch, log / log_dict as no-ops)."""
import random
import numpy as np
import torch
from . import utilities, callbacks, loggers

__version__ = "0.0-shim"


class LightningModule(torch.nn.Module):
    @property
    def device(self):
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def global_step(self):
        return 0

    @property
    def current_epoch(self):
        return 0

    def log(self, *args, **kwargs):
        pass

    def log_dict(self, *args, **kwargs):
        pass

    def print(self, *args, **kwargs):
        print(*args, **kwargs)


class Trainer:
    def __init__(self, *a, **k):
        raise NotImplementedError("pytorch_lightning shim: no Trainer")


def seed_everything(seed=None, workers=False):
    seed = 0 if seed is None else int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return seed
''',
    "pytorch_lightning/utilities/__init__.py": '''
from .distributed import rank_zero_only
''',
    "pytorch_lightning/utilities/distributed.py": '''
import functools


def rank_zero_only(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapped


rank_zero_only.rank = 0
''',
    "pytorch_lightning/utilities/rank_zero.py": '''
from .distributed import rank_zero_only
''',
    "pytorch_lightning/callbacks.py": '''
class Callback:
    pass


class ModelCheckpoint(Callback):
    def __init__(self, *a, **k):
        pass
''',
    "pytorch_lightning/loggers.py": '''
class WandbLogger:
    def __init__(self, *a, **k):
        raise NotImplementedError("pytorch_lightning shim: no loggers")
''',
    "open_clip/__init__.py": '''
"""Stand-in for open_clip: imported by ldm.modules.encoders.modules, used only by
FrozenOpenCLIPEmbedder (SD 2.x), which cnc_v1.yaml does not use."""


def create_model_and_transforms(*a, **k):
    raise NotImplementedError("open_clip shim")


def tokenize(*a, **k):
    raise NotImplementedError("open_clip shim")
''',
}

# ViT-L/14 (openai/clip-vit-large-patch14) sizes.
CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=768, pad_token_id=1, bos_token_id=49406,
                 eos_token_id=49407)
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   num_channels=3, patch_size=14, image_size=224, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, projection_dim=768)

# as in the official src/test/test_cnc.py
DEFAULT_NEGATIVE_PROMPT = ('longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, '
                           'fewer digits, cropped, worst quality, low quality')
PROMPT = 'a robot astronaut in front of a cyberpunk train' + ' ,masterpiece, ultra detailed, high resolution'


def log(*a):
    print("[bench_official]", *a, file=sys.stderr, flush=True)


def write_shims():
    root = tempfile.mkdtemp(prefix="cnc_official_shims_")
    for rel, src in SHIMS.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(src.lstrip("\n"))
    return root


class FakeCLIPTokenizer:
    """File-free tokenizer: fixed ids, (B, 77) int64; [BOS] ids [EOS] then EOS-padding as CLIP does."""
    bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 49407
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77, padding="max_length", return_tensors="pt",
                 add_special_tokens=True, **kwargs):
        import torch
        texts = [text] if isinstance(text, str) else list(text)
        max_length = max_length or 77
        rows = []
        for t in texts:
            body = [320 + (ord(c) % 4000) for c in t][: max_length - 2]
            ids = [self.bos_token_id] + body + [self.eos_token_id]
            ids = ids + [self.pad_token_id] * (max_length - len(ids))
            rows.append(ids)
        out = {"input_ids": torch.tensor(rows, dtype=torch.long)}
        out["length"] = torch.full((len(rows),), max_length, dtype=torch.long)
        return out


def patch_transformers():
    """Random-init CLIP from ViT-L/14 configs instead of from_pretrained (no files, no network)."""
    import transformers
    from transformers.models.clip import modeling_clip, tokenization_clip  # noqa: F401  (load now)
    from transformers.models.t5 import modeling_t5  # noqa: F401  (imported by ldm encoders)
    text_cfg = transformers.CLIPTextConfig(**CLIP_TEXT)
    vision_cfg = transformers.CLIPVisionConfig(**CLIP_VISION)
    # transformers 4.29.2 (official environment.yaml) ran CLIP with plain (eager) attention.
    for cfg in (text_cfg, vision_cfg):
        cfg._attn_implementation = "eager"

    def text_from_pretrained(cls, *a, **k):
        return cls(text_cfg)

    def vision_from_pretrained(cls, *a, **k):
        return cls(vision_cfg)

    def tok_from_pretrained(cls, *a, **k):
        return FakeCLIPTokenizer()

    transformers.CLIPTextModel.from_pretrained = classmethod(text_from_pretrained)
    transformers.CLIPVisionModelWithProjection.from_pretrained = classmethod(vision_from_pretrained)
    transformers.CLIPTokenizer.from_pretrained = classmethod(tok_from_pretrained)
    try:
        transformers.logging.set_verbosity_error()
    except Exception:
        pass


def build_model(official_dir):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(os.path.join(official_dir, "configs", "cnc_v1.yaml"))
    t0 = time.perf_counter()
    model = instantiate_from_config(cfg.model).cpu()
    # FrozenCLIPEmbedder defaults to device="cuda" (the config passes none); the tokens go to CPU here.
    model.cond_stage_model.device = "cpu"
    n = sum(p.numel() for p in model.parameters())
    log(f"built {type(model).__name__} from configs/cnc_v1.yaml in {time.perf_counter() - t0:.1f}s, "
        f"{n / 1e6:.1f}M params")
    return model


def make_sampler(model):
    import torch
    from models.ddim_hacked import DDIMSampler

    class CPUDDIMSampler(DDIMSampler):
        # The official register_buffer moves every schedule tensor to "cuda"; keep them on the
        # model's device instead (same values; schedule set-up only, not in the timed call).
        def register_buffer(self, name, attr):
            if isinstance(attr, torch.Tensor):
                attr = attr.to(self.model.device)
            setattr(self, name, attr)

    return CPUDDIMSampler(model)


PROFILE_ROWS = 25


def timed(fn, repeats, profile=False):
    fn()  # warm-up, not counted
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if profile:  # one more call under torch.profiler: the ops with the most self CPU time, on stderr
        import torch
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        log("profile of one more call:\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                      row_limit=PROFILE_ROWS))
    return times


def bench_sample(model, size, repeats, profile=False):
    import torch
    model.eval()
    sampler = make_sampler(model)
    sampler.make_schedule(ddim_num_steps=50, ddim_eta=0)
    hw, bs = size, 1
    with torch.no_grad():
        # conditioning as src/test/test_cnc.py builds it (random stand-ins for the annotator outputs)
        fg_depth = torch.rand(1, 3, hw, hw)                      # get_depth(...) in [0, 1], 3 channels
        bg_depth = torch.rand(1, 3, hw, hw)
        fg_emb = torch.randn(1, 768)                             # CLIPVisionModelWithProjection.image_embeds
        bg_emb = torch.randn(1, 768)
        fg_mask = (torch.rand(1, 1, hw, hw) > 0.5).float()       # get_mask(..., resize=(hw, hw))
        c_cross = model.get_learned_conditioning(PROMPT)
        uc_cross = model.get_learned_conditioning(DEFAULT_NEGATIVE_PROMPT)
        cond = {"bg_depth": [bg_depth.repeat(bs, 1, 1, 1)], "fg_depth": [fg_depth.repeat(bs, 1, 1, 1)],
                "bg_emb": [bg_emb.repeat(bs, 1)], "fg_emb": [fg_emb.repeat(bs, 1)],
                "c_crossattn": [c_cross.repeat(bs, 1, 1)], "mask": [fg_mask.repeat(bs, 1, 1, 1)]}
        un_cond = {"bg_depth": [bg_depth.repeat(bs, 1, 1, 1)], "fg_depth": [fg_depth.repeat(bs, 1, 1, 1)],
                   "bg_emb": [bg_emb.repeat(bs, 1)], "fg_emb": [fg_emb.repeat(bs, 1)],
                   "c_crossattn": [uc_cross.repeat(bs, 1, 1)], "mask": [fg_mask.repeat(bs, 1, 1, 1)]}
        img = torch.randn(bs, 4, hw // 8, hw // 8)
    # first step of ddim_sampling: step = ddim_timesteps[-1], index = total_steps - 1
    total_steps = sampler.ddim_timesteps.shape[0]
    step = int(sampler.ddim_timesteps[-1])
    ts = torch.full((bs,), step, dtype=torch.long)
    log(f"sample: latent {tuple(img.shape)}, t={step}, index={total_steps - 1}, "
        f"context {tuple(c_cross.shape)}, mask {tuple(fg_mask.shape)}")

    def call():
        sampler.p_sample_ddim(img, cond, ts, index=total_steps - 1, use_original_steps=False,
                              quantize_denoised=False, temperature=1., noise_dropout=0.,
                              score_corrector=None, corrector_kwargs=None,
                              unconditional_guidance_scale=7.5, unconditional_conditioning=un_cond,
                              dynamic_threshold=None, global_strength=[1.0, 1.0])
    return timed(call, repeats, profile)


def bench_vae(model, size, repeats, profile=False):
    import torch
    model.eval()
    z = torch.randn(1, 4, size // 8, size // 8)
    log(f"vae: decode_first_stage {tuple(z.shape)}")

    def call():
        with torch.no_grad():
            model.decode_first_stage(z)
    return timed(call, repeats, profile)


def bench_train(model, size, repeats, profile=False):
    import torch
    # src/train/train.py: model.learning_rate = 1e-5 (default), model.sd_locked = True; Lightning
    # puts the module in train mode (first/cond stage keep eval via disabled_train).
    model.learning_rate = 1e-5
    model.sd_locked = True
    model.train()
    opt = model.configure_optimizers()
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    s = size
    # one CnCDataset_Full item, collated to batch size 1
    batch = {
        "jpg": torch.rand(1, s, s, 3) * 2 - 1,                 # Normalize(0.5, 0.5) -> [-1, 1], h w c
        "txt": ["a robot astronaut in front of a cyberpunk train"],
        "bg_depth": torch.rand(1, s, s, 3),                    # ToTensor of the depth jpg, h w c
        "fg_depth": torch.rand(1, s, s, 3),
        "bg_emb": torch.randn(1, 768),                         # saved CLIP image embedding, squeezed
        "fg_emb": torch.randn(1, 768),
        "mask": (torch.rand(1, 1, s, s) > 0.5).float(),        # ToTensor of the L-mode mask png
    }
    log(f"train: sd_locked=True, lr=1e-5, AdamW over {n_opt / 1e6:.1f}M params, image {s}x{s}")

    def call():
        loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return timed(call, repeats, profile)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-dir", default="/work/official/cnc")
    ap.add_argument("--what", choices=["sample", "vae", "train"], required=True)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true",
                    help="after the timed calls, profile one more and print its top ops to stderr")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.size % 64:
        ap.error("--size must be a multiple of 64 (3 down-samplings of the size/8 latent)")

    official_dir = os.path.abspath(args.official_dir)
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    shim_dir = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import torch
            torch.set_num_threads(args.threads)
            torch.manual_seed(0)
            torch.set_default_dtype(torch.float32)
            # transformers' own (lazy) modules probe for torchvision; load them before the
            # torchvision stand-in is on sys.path so they see the real environment (no torchvision).
            patch_transformers()
            shim_dir = write_shims()
            sys.path.insert(0, official_dir)
            sys.path.insert(0, shim_dir)
            model = build_model(official_dir)
            torch.manual_seed(0)
            fn = {"sample": bench_sample, "vae": bench_vae, "train": bench_train}[args.what]
            times = fn(model, args.size, args.repeats, args.profile)
    finally:
        if shim_dir:
            shutil.rmtree(shim_dir, ignore_errors=True)
    rec = {"what": args.what, "size": args.size, "threads": args.threads, "torch": torch.__version__,
           "times_s": [round(t, 6) for t in times], "median_s": round(statistics.median(times), 6)}
    print(json.dumps(rec), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
