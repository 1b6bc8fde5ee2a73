"""Convert official Compose-and-Conquer / Stable Diffusion PyTorch checkpoints to cnc_jax (orbax).

  python convert_torch_weights.py convert SRC --out DIR [--config PRESET|YAML|JSON] [--ema]
  python convert_torch_weights.py convert TRUNK.pth --lpips-lin HEADS.pth --out DIR      (LPIPS)
  python convert_torch_weights.py init-global SD_CKPT --out DIR
  python convert_torch_weights.py init-local UNI_OR_SD_CKPT --out DIR
  python convert_torch_weights.py integrate LOCAL GLOBAL --out DIR
  python convert_torch_weights.py export SRC --out PATH --format cnc|official|safetensors|diffusers [--step N]
         [--dtype float32|float16|bfloat16] [--tokenizer DIR|byte_level]   (SRC: a train.py run folder or a
         converted folder)
         official: PATH.ckpt + its official model YAML PATH.yaml (+ PATH_clip_text_config.json for a text tower
         other than CLIP ViT-L/14); a model the official code cannot build is refused unless --allow-unofficial

No torch needed: checkpoints are read by cnc_jax's restricted reader, which never runs code a
pickle names. Every failure is one message on stderr and leaves no output: exit status 2, or 1 when the disk
refuses the write (full, read-only: "error: <output>: <reason>"). A killed run leaves `<out>.partial-<pid>` files
or folders; the next run writing the same output removes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cnc_jax.model_config import ConfigError, global_fuser_v1, load_config, local_fuser_v1
from cnc_jax.torchfile.state_dict import CheckpointError, load_state_dict

PRESET_HELP = "preset (cnc_v1, local_fuser_v1, global_fuser_v1, sd15), official model YAML, or cnc_jax config JSON"
# the official FrozenCLIPEmbedder builds its tower with from_pretrained(version) (default openai/clip-vit-large-patch14)
OFFICIAL_TEXT_CONFIG = (" (CLIP text config of this tower, read by cnc_jax with the YAML; the official code needs a "
                        "folder holding it as config.json, weights of that shape (e.g. the text_encoder/ files of a "
                        "diffusers export; the .ckpt's replace them) and the tower's CLIP tokenizer, named by the "
                        "YAML's cond_stage_config.params.version)")
# diffusers' Stable Diffusion pipelines require a tokenizer component unless the caller passes tokenizer=None
NO_TOKENIZER = ("no tokenizer exported: load it with DiffusionPipeline.from_pretrained('{out}', tokenizer=None) and "
                "pass prompt_embeds / negative_prompt_embeds, or export again with --tokenizer FOLDER (or byte_level)")


def _config(spec, text_config, default=None):

    if spec is None:
        return default
    return load_config(spec, text_config=text_config)


def _load_model(path: str, config_spec, text_config):
    """(config, params) from a converted, run or diffusers folder, or an official checkpoint (config detected)."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import detect_config, load_official_params, load_weights

    if os.path.isdir(path):
        return load_weights(path)
    state_dict = load_state_dict(path)
    config = _config(config_spec, text_config) or detect_config(state_dict)
    return config, load_official_params(state_dict, config)


def _sd_source(path: str, config):
    """A diffusers SD folder as an official state dict (its SD parts, checked against `config`), else `path`."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import SD_PARTS, diffusers_state_dict, is_diffusers_folder

    return diffusers_state_dict(path, config, SD_PARTS) if is_diffusers_folder(path) else path


def cmd_convert(args):
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import (ConversionError, config_from_diffusers, detect_config, detect_eval_kind,
                                    detect_kind, diffusers_state_dict, is_diffusers_folder, load_official_annotator,
                                    load_official_eval_net, load_official_params)

    info = {"source": os.path.abspath(args.src)}
    if is_diffusers_folder(args.src):
        config = _config(args.config, args.text_config) or config_from_diffusers(args.src)
        print(f"converting diffusers folder {args.src} as mode {config.mode!r}")
        return config, load_official_params(diffusers_state_dict(args.src, config), config), info
    state_dict = None if os.path.isdir(args.src) else load_state_dict(args.src)
    kind = detect_eval_kind(args.src, state_dict)
    if kind is not None or args.lpips_lin:  # an evaluation network: FID Inception, LPIPS trunk + heads, CLIPModel
        kind, config, params = load_official_eval_net(args.src, kind, lpips_heads=args.lpips_lin,
                                                      state_dict=state_dict)
        print(f"converting {args.src} as evaluation network {kind!r}")
        heads = {"lpips_heads": os.path.abspath(args.lpips_lin)} if args.lpips_lin else {}
        return config, params, {**info, **heads, "kind": kind}
    kind = detect_kind(args.src, state_dict)
    if kind is not None:  # an annotator: CLIP vision / DPT transformers folder, u2net.pth, MiDaS .pt
        kind, config, params = load_official_annotator(args.src, kind)
        print(f"converting {args.src} as annotator {kind!r}")
        return config, params, {**info, "kind": kind}
    if state_dict is None:
        raise ValueError(f"{args.src}: a folder that is neither a transformers CLIP vision / DPT model nor a file")
    config = _config(args.config, args.text_config)
    detected = config is None
    config = config or detect_config(state_dict)
    print(f"converting {args.src} as mode {config.mode!r}" + (" (EMA UNet weights)" if args.ema else ""))
    try:
        params = load_official_params(state_dict, config, ema=args.ema)
    except ConversionError as e:
        if not (detected and e.report):
            raise
        r = e.report  # a model of another size than the preset its parts suggest: name the fix, not every key
        example = (r.mismatched or r.missing or r.unexpected)[0]
        raise ConversionError(f"{args.src}: does not fit the full-size {config.mode!r} preset detected from its "
                              f"parts ({len(r.mismatched)} mis-shaped, {len(r.missing)} missing, {len(r.unexpected)} "
                              f"unexpected keys; e.g. {example}): for a model of another size pass --config (its "
                              "official model YAML, a cnc_jax config.json or a preset), and --text-config for another "
                              "CLIP text tower") from None
    return config, params, {**info, "ema": args.ema}


def cmd_init_global(args):
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import init_global_params

    config = _config(args.config, args.text_config) or global_fuser_v1()
    config, params = init_global_params(_sd_source(args.sd_ckpt, config), config, seed=args.seed)
    print(f"initialised a global fuser from scratch; UNet / VAE / text encoder from {args.sd_ckpt}")
    return config, params, {"source": os.path.abspath(args.sd_ckpt), "operation": "init-global"}


def cmd_init_local(args):
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import init_local_params

    config = _config(args.config, args.text_config) or local_fuser_v1()
    config, new, params = init_local_params(_sd_source(args.src, config), config, seed=args.seed)
    print(f"new local-fuser params (freshly initialised, zero convs zero): {len(new)}")
    for name in new:
        print(f"  {name}")
    return config, params, {"source": os.path.abspath(args.src), "operation": "init-local"}


def cmd_integrate(args):
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import integrate_params

    local = _load_model(args.local, args.local_config, args.text_config)
    glob = _load_model(args.glob, args.global_config, args.text_config)
    config, params = integrate_params(local, glob)
    return config, params, {"source": [os.path.abspath(args.local), os.path.abspath(args.glob)],
                            "operation": "integrate"}


def _export_source(src: str, step):
    """(config, params, step) of what export reads: a run folder at `step` (default: its latest; the step returned is
    the one loaded), or a converted / diffusers folder (step: what a converted folder records, e.g. written by an
    `export --format cnc` of a run, else None)."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import is_diffusers_folder, is_run_folder, load_run, load_weights, read_info

    if is_run_folder(src):
        config, params, meta = load_run(src, step)
        return config, params, meta["step"]
    config, params = load_weights(src, step)
    recorded = None if is_diffusers_folder(src) else read_info(src).get("step")
    return config, params, recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


def export_tokenizer(src: str, given):
    """The tokenizer a diffusers export carries: --tokenizer, else a run folder's own (its run_model.json names a
    folder that still exists, or byte_level), else none."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import is_run_folder, read_run_info
    from cnc_jax.text_encoder import BYTE_LEVEL

    if given:
        return given
    recorded = read_run_info(src).get("tokenizer") if is_run_folder(src) else None
    return recorded if recorded and (recorded == BYTE_LEVEL or os.path.isdir(recorded)) else None


def cmd_export(args):
    """A run folder (trainable params of its checkpoint + the frozen ones it started from) or a converted folder
    -> one of the export formats. Returns the path written."""
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import export_model
    from cnc_jax.checkpoint.official_yaml import official_files

    if args.allow_unofficial and args.format != "official":
        raise ValueError("--allow-unofficial is for --format official (the one format that carries an official "
                         "model YAML)")
    if not os.path.isdir(args.src):
        raise ValueError(f"{args.src}: not a folder (export takes a train.py run folder or a converted folder)")
    config, params, step = _export_source(args.src, args.step)
    tokenizer = export_tokenizer(args.src, args.tokenizer)
    info = {"source": os.path.abspath(args.src), "operation": "export", "step": step}
    out = export_model(config, params, args.out, args.format, dtype=args.dtype, info=info, tokenizer=tokenizer,
                       overwrite=args.force, global_step=step or 0, allow_unofficial=args.allow_unofficial,
                       warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    print(f"exported {args.src} as {args.format} ({args.dtype or 'stored dtypes'})")
    if args.format == "official":
        print(f"global_step {step or 0}" + ("" if step is not None else " (the source records no training step)"))
        for path in official_files(out, config):
            print(f"wrote {path}" + (" (official model YAML: the official code builds the model from it)"
                                     if path.endswith(".yaml") else OFFICIAL_TEXT_CONFIG))
    if args.format == "diffusers" and not tokenizer:
        print(NO_TOKENIZER.format(out=out))
    return config, params, out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
        p.add_argument("--force", action="store_true", help="replace an existing output folder")
        p.add_argument("--text-config", default=None,
                       help="HF CLIPTextConfig JSON or folder, for text towers other than CLIP ViT-L/14")
        return p

    p = add("convert", cmd_convert, "official CnC / fuser / SD-1.5 checkpoint, or annotator weights -> orbax")
    p.add_argument("src", help=".ckpt / .pth / .pt / .bin / .safetensors; u2net(p).pth, MiDaS dpt_large_384.pt, "
                               "a transformers folder of CLIP vision / DPT / a whole CLIPModel (CLIPScore), "
                               "a diffusers SD 1.5 (inpainting) folder; "
                               "evaluation: pt_inception-2015-12-05-6726825d.pth, an AlexNet trunk (+ --lpips-lin)")
    p.add_argument("--config", default=None, help=PRESET_HELP + " (default: detected from the checkpoint)")
    p.add_argument("--ema", action="store_true", help="take the UNet from model_ema.* (SD checkpoints)")
    p.add_argument("--lpips-lin", default=None, metavar="HEADS",
                   help="LPIPS: the lpips package's heads file (weights/v0.1/alex.pth) for a torchvision trunk SRC")

    p = add("init-global", cmd_init_global, "SD 1.5 + a fresh global fuser (official init_global)")
    p.add_argument("sd_ckpt", help="SD 1.5 checkpoint file or diffusers folder")
    p.add_argument("--config", default=None, help=PRESET_HELP + " (default: global_fuser_v1)")
    p.add_argument("--seed", type=int, default=0)

    p = add("init-local", cmd_init_local, "local fuser from Uni-ControlNet (or SD) weights (official init_local_fromuni)")
    p.add_argument("src", help="Uni-ControlNet / SD 1.5 checkpoint file, or an SD 1.5 diffusers folder")
    p.add_argument("--config", default=None, help=PRESET_HELP + " (default: local_fuser_v1)")
    p.add_argument("--seed", type=int, default=0)

    p = add("integrate", cmd_integrate, "trained local + global fuser -> one cnc checkpoint (official integrate)")
    p.add_argument("local", help="local-fuser model: converted or train.py run folder, or official checkpoint")
    p.add_argument("glob", metavar="global", help="global-fuser model: converted or train.py run folder, or official "
                                                  "checkpoint")
    p.add_argument("--local-config", default=None, help=PRESET_HELP + " for an official LOCAL checkpoint")
    p.add_argument("--global-config", default=None, help=PRESET_HELP + " for an official GLOBAL checkpoint")

    p = sub.add_parser("export", help="train.py run folder or converted folder -> cnc / official .ckpt / "
                                      ".safetensors / diffusers folder")
    p.set_defaults(fn=cmd_export)
    p.add_argument("src", help="train.py run folder (latest checkpoint, or --step) or converted folder")
    p.add_argument("--out", required=True, help="output file (official, safetensors) or folder (cnc, diffusers)")
    p.add_argument("--format", required=True, choices=("cnc", "official", "safetensors", "diffusers"))
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default: the latest)")
    p.add_argument("--allow-unofficial", action="store_true",
                   help="official: write the .ckpt and model YAML even for a model the official code cannot build "
                        "(e.g. the tiny preset), with a warning for each reason (default: refuse)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast the weights (default: as stored; schedule buffers stay float32)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer of a diffusers export: a CLIP tokenizer folder (tokenizer.json [+ "
                        "tokenizer_config.json], or vocab.json + merges.txt) or byte_level (default: a run's own)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.checkpoint import ConversionError, StoreError, save_converted
    from cnc_jax.checkpoint.library_errors import os_error_line

    expected = (ConversionError, CheckpointError, ConfigError, StoreError, ValueError)
    start = time.time()
    try:
        if os.path.exists(args.out) and not args.force:
            raise StoreError(f"{args.out} already exists (pass --force to replace it)")
        if args.command == "export":
            config, params, out = args.fn(args)
            info = {}
        else:
            config, params, info = args.fn(args)
            out = save_converted(args.out, config, params, overwrite=args.force, **info)
    except OSError as e:
        code, line = os_error_line(e, args.out)
        print(f"error: {line}", file=sys.stderr)
        return code
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # start-up time: jax and the models load when the command runs (not for --help or a flag error)
    from cnc_jax.models.build import count_params

    counts = ", ".join(f"{part} {count_params(tree) / 1e6:.2f}M" for part, tree in params.items())
    what = f"mode {config.mode}" if info.get("kind", "cnc") == "cnc" else info["kind"]
    print(f"wrote {out} ({what}; {counts}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
