"""Model flags and loading shared by the sampling front ends (sample.py, demo.py): one place to load weights.

load_models(args) reads --checkpoint / --tokenizer / --u2net / --dpt / --clip-vision, or builds tiny random
models for --random-init; load_pipeline(args) adds the sharded Pipeline with --per-device-batch / --dtype /
--attention. check_model_flags(args) refuses bad values before anything loads.
"""

from __future__ import annotations

import argparse
import os

from cnc_jax.model_config import ConfigError, load_config
from cnc_jax.models.attention_kernels import IMPLEMENTATIONS
from cnc_jax.torchfile.state_dict import CheckpointError

RANDOM_INIT_DEFAULTS = {"size": 128, "steps": 10}  # job defaults with --random-init: seconds on a CPU


def convert_hint(script: str) -> str:
    """What to do when no weights were given: convert the official ones, or try random ones."""
    return f"""no --checkpoint given. Convert the official weights first, e.g.
  python convert_torch_weights.py convert trained_weights/cnc_v1.ckpt --out ckpt/cnc_v1
  python convert_torch_weights.py convert annotator/u2net/weights/u2net.pth --out ckpt/u2net
  python convert_torch_weights.py convert <folder of Intel/dpt-large or MiDaS dpt_large_384.pt> --out ckpt/dpt
  python convert_torch_weights.py convert <folder of openai/clip-vit-large-patch14> --out ckpt/clip_vision
then: python {script} --checkpoint ckpt/cnc_v1 --tokenizer <folder with the CLIP tokenizer files> \\
        --u2net ckpt/u2net --dpt ckpt/dpt --clip-vision ckpt/clip_vision ...
or try it with random weights: python {script} --random-init ..."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The weight flags and the pipeline flags (devices, dtype, attention)."""
    p.add_argument("--checkpoint", help="converted CnC checkpoint folder (convert_torch_weights.py convert), a "
                                        "train.py run folder (its latest checkpoint) or a diffusers export of one")
    p.add_argument("--tokenizer", help="folder with the CLIP tokenizer files (vocab.json + merges.txt)")
    p.add_argument("--clip-vision", help="CLIP vision weights, for fg/bg embedding images")
    p.add_argument("--u2net", help="U2-Net weights, for masks from images")
    p.add_argument("--dpt", help="DPT weights, for depth maps from images")
    p.add_argument("--random-init", action="store_true", help="tiny random-weight models (pipeline smoke test)")
    p.add_argument("--per-device-batch", type=int, default=1, help="images per device per batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--attention", choices=IMPLEMENTATIONS + ("auto",), default="auto",
                   help="self-attention: xla, dot_product (cuDNN flash on GPU where jax takes the inputs), chunked "
                        "(memory-bounded; fastest on CPU), splash (TPU); auto = chunked on CPU, dot_product on GPU, "
                        "splash on TPU")


def check_model_flags(args) -> None:
    """ValueError naming the flag for a value no run can use (a batch of 0 or fewer images per device)."""
    if args.per_device_batch < 1:
        raise ValueError(f"--per-device-batch: must be >= 1 (got {args.per_device_batch})")


def load_models(args):
    """(config, params, text encoder, annotators, description) from flags."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.sampling.pipeline import Annotators
    from cnc_jax.text_encoder import TextEncoder, tokenizer_by_name

    if args.random_init:
        return random_models()
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator
    from cnc_jax.annotators.saliency import SaliencyMasker, saliency_mask
    from cnc_jax.checkpoint import is_run_folder, load_weights, read_run_info

    config, params = load_weights(args.checkpoint)
    tokenizer = args.tokenizer or (read_run_info(args.checkpoint).get("tokenizer")
                                   if is_run_folder(args.checkpoint) else None)
    if not tokenizer:
        raise ValueError("--tokenizer is required with --checkpoint (the CLIP tokenizer of "
                         "openai/clip-vit-large-patch14: a folder with vocab.json and merges.txt)")
    text = TextEncoder(config.text_encoder, params["text_encoder"], tokenizer_by_name(tokenizer))
    u2 = SaliencyMasker.from_checkpoint(args.u2net) if args.u2net else None
    annotators = Annotators(
        embedder=CLIPImageEmbedder.from_pretrained(args.clip_vision) if args.clip_vision else None,
        masker=(lambda images, hw: saliency_mask(u2.params, images, config=u2.config, size=hw)) if u2 else None,
        depth=DepthEstimator.from_pretrained(args.dpt) if args.dpt else None)
    return config, params, text, annotators, os.path.abspath(args.checkpoint)


def random_models():
    """The 'tiny' preset and tiny annotators with random weights, and a byte-level tokenizer."""
    import jax

    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.annotators.clip_image import CLIPImageEmbedder
    from cnc_jax.annotators.depth import DepthEstimator
    from cnc_jax.annotators.saliency import saliency_mask
    from cnc_jax.models.build import init_params
    from cnc_jax.models.tiny_annotators import tiny_annotator_configs, tiny_annotator_params
    from cnc_jax.sampling.pipeline import Annotators
    from cnc_jax.text_encoder import TextEncoder, byte_level_tokenizer

    config = load_config("tiny")
    params = init_params(config, seed=0)
    cfgs, weights = tiny_annotator_configs(), tiny_annotator_params(seed=1)
    u2_params = jax.device_put(weights["u2net"])
    annotators = Annotators(
        embedder=CLIPImageEmbedder(cfgs["clip_vision"], weights["clip_vision"]),
        masker=lambda images, hw: saliency_mask(u2_params, images, config=cfgs["u2net"], size=hw),
        depth=DepthEstimator(cfgs["dpt"], weights["dpt"]))
    text = TextEncoder(config.text_encoder, params["text_encoder"], byte_level_tokenizer())
    return config, params, text, annotators, "random-init (tiny preset)"


# What load_pipeline may raise for unusable weights (caught by the front ends and reported as one message).
def load_errors() -> tuple:
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import ConversionError, StoreError

    return StoreError, CheckpointError, ConversionError, ConfigError, ValueError, OSError


def load_pipeline(args):
    """(Pipeline, description of the weights) from the flags of add_model_flags."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.models.attention_kernels import resolve
    from cnc_jax.sampling.pipeline import Pipeline

    check_model_flags(args)
    config, params, text, annotators, source = load_models(args)
    pipeline = Pipeline(config, params, text, annotators, per_device_batch=args.per_device_batch, dtype=args.dtype,
                        attention=resolve(args.attention))
    return pipeline, source
