"""The Compose and Conquer gradio demo (the official src/test/test_cnc.py) on the JAX pipeline.

  python demo.py --checkpoint ckpt/cnc_v1 --tokenizer tokenizer/ --u2net ckpt/u2net --dpt ckpt/dpt \\
                 --clip-vision ckpt/clip_vision --examples ../shared/demo      # then open http://127.0.0.1:7860
  python demo.py --random-init --examples ../shared/demo                      # tiny random models, no weights

Four images in (foreground, background, and the two embedding images), depth and global controls, a gallery of
images and one of the conditions, and a zip of the images with their job.json. Requests queue: one sampling
at a time. Each new (size, sampler, steps, guidance on/off) compiles once; the page says so on its first run.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shutil
import signal
import sys
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check / telemetry: the demo runs offline
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cnc_jax.cli.model_flags import (RANDOM_INIT_DEFAULTS, add_model_flags, convert_hint, load_errors,  # noqa: E402
                                     load_pipeline)
from cnc_jax.platform import configure_cpu
from cnc_jax.sampling.demo_jobs import (  # noqa: E402
    DEFAULT_PROMPT,
    IMAGE_LABELS,
    SLIDERS,
    DemoError,
    DemoRunner,
    example_images,
    step_counts_off_grid,
)
from cnc_jax.sampling.demo_prompts import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from cnc_jax.sampling.jobs import DEPTH_VERSIONS, IMAGE_FIELDS  # noqa: E402
from cnc_jax.sampling.sampler_names import DEFAULT_SAMPLER, SAMPLER_NAMES  # noqa: E402

RANDOM_NOTICE = ("**Random weights (`--random-init`)**: tiny randomly initialised models; the images are noise. "
                 "Start with `--checkpoint` (converted official weights) for real images.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--examples", help="folder of example images to fill the four image inputs with")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from other hosts)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    return p


def build_demo(runner: DemoRunner, examples: dict, random_weights: bool):
    """The page: the official demo's layout and controls, plus width/height, the prompt suffix and a zip.

    A new job field (like the sampler dropdown) is one component here, one parameter of run() and one entry of
    `values`; weights (e.g. run folders as --checkpoint) load in cnc_jax.cli.model_flags.load_models only.
    """
    import gradio as gr

    defaults = RANDOM_INIT_DEFAULTS if random_weights else {"size": SLIDERS["size"].value,
                                                            "steps": SLIDERS["steps"].value}

    def slider(field, **kw):
        s = SLIDERS[field]
        return gr.Slider(**{"label": s.label, "minimum": s.minimum, "maximum": s.maximum, "step": s.step,
                            "value": s.value, **kw})

    off_grid = ", ".join(map(str, step_counts_off_grid(runner.pipeline.config.diffusion)))
    with gr.Blocks(title="Compose and Conquer", delete_cache=(3600, 3600)) as demo:  # gradio's copies: 1 h
        gr.Markdown("## Compose and Conquer Demo")
        if random_weights:
            gr.Markdown(RANDOM_NOTICE, elem_id="random-notice")
        with gr.Row():
            with gr.Column(scale=2):
                images = {}
                for row in (IMAGE_FIELDS[:2], IMAGE_FIELDS[2:]):
                    with gr.Row():
                        for field in row:
                            images[field] = gr.Image(sources=["upload"], type="pil", image_mode=None,
                                                     label=IMAGE_LABELS[field], value=examples.get(field),
                                                     elem_id=field)
                depth_version = gr.Radio(list(DEPTH_VERSIONS), label="Foreground Depth Version", value="v2")
                controls = {f: slider(f) for f in ("fg_depth_control", "bg_depth_control", "fg_global_control",
                                                   "bg_global_control")}
                size_range = {} if defaults["size"] >= SLIDERS["size"].minimum else {"minimum": 64, "step": 64}
                size = slider("size", elem_id="size", value=defaults["size"], **size_range)  # = width and height
                with gr.Row():
                    width = gr.Number(label="Width", value=defaults["size"], step=64, elem_id="width",
                                      info="a multiple of 64; Image size sets both")
                    height = gr.Number(label="Height", value=defaults["size"], step=64, elem_id="height",
                                       info="a multiple of 64")
                batch_size = slider("num_images", elem_id="batch_size")
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT)
                neg_prompt = gr.Textbox(label="Negative Prompt", value=DEFAULT_NEGATIVE_PROMPT)
                suffix = gr.Checkbox(label="Append the official prompt suffix (\", masterpiece, ultra detailed, "
                                           "high resolution\")", value=True)
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler",
                                      elem_id="sampler", info="ddim is the official sampler; the README's table "
                                                              "lists the others and their suggested step counts")
                ddim_steps = slider("steps", value=defaults["steps"],
                                    info=f"ddim: off the official grid: {off_grid}; other samplers: any count")
                cfg_scale = slider("cfg_scale")
                seed = slider("seed", info="-1: a random seed (the one used is shown with the result)")
                run_button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                status = gr.Markdown(label="Status", elem_id="status")
                image_gallery = gr.Gallery(label="Output", preview=True, format="png", elem_id="images")
                cond_gallery = gr.Gallery(label="Conditions", preview=True, format="png", elem_id="conditions")
                seed_used = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="seed_used")
                download = gr.File(label="Download: images, conditions and job.json (zip)", elem_id="download")

        size.change(None, size, [width, height], js="(s) => [s, s]",  # in the browser: no round trip to wait for
                    queue=False, api_visibility="private")

        def run(fg_image, bg_image, fg_emb_image, bg_emb_image, depth_version, fg_depth_control, bg_depth_control,
                fg_global_control, bg_global_control, width, height, batch_size, prompt, negative_prompt, steps,
                cfg_scale, seed, prompt_suffix, sampler=DEFAULT_SAMPLER, progress=gr.Progress()):
            uploads = dict(zip(IMAGE_FIELDS, (fg_image, bg_image, fg_emb_image, bg_emb_image)))
            values = dict(depth_version=depth_version, fg_depth_control=fg_depth_control,
                          bg_depth_control=bg_depth_control, fg_global_control=fg_global_control,
                          bg_global_control=bg_global_control, width=width, height=height, num_images=batch_size,
                          prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                          seed=seed, prompt_suffix=prompt_suffix, sampler=sampler)
            try:
                r = runner.run(values, uploads, notify=lambda m: gr.Info(m, duration=20),
                               progress=lambda f, d: progress(f, desc=d))
            except DemoError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return r.images, r.conditions, r.seed, r.zip_path, r.status

        run_button.click(run, inputs=[*images.values(), depth_version, *controls.values(), width, height, batch_size,
                                      prompt, neg_prompt, ddim_steps, cfg_scale, seed, suffix, sampler],
                         outputs=[image_gallery, cond_gallery, seed_used, download, status], api_name="run",
                         concurrency_limit=1, concurrency_id="sampler")  # one sampling at a time on the devices
    return demo


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.checkpoint and not args.random_init:
        print(f"error: {convert_hint('demo.py')}", file=sys.stderr)
        return 2

    if importlib.util.find_spec("gradio") is None:
        print('error: the demo needs gradio: pip install "cnc_jax[demo]" (in a checkout: pip install --no-deps -r '
              'requirements-demo.txt)', file=sys.stderr)
        return 2
    configure_cpu()
    try:
        examples = example_images(args.examples)
        pipeline, source = load_pipeline(args)
    except (DemoError, *load_errors()) as e:
        print(f"error: cannot start the demo: {e}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="cnc-demo-")  # the runs' files, until they are downloaded: gone on exit
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminated demo cleans up as on Ctrl-C
    runner = DemoRunner(pipeline, source, workdir, random_weights=args.random_init)
    demo = build_demo(runner, examples, args.random_init)
    print(f"weights: {source}; outputs under {workdir}", flush=True)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[workdir], show_error=True,
        ssr_mode=False, footer_links=["api"], pwa=False, quiet=True, prevent_thread_lock=True)
    print(f"serving on http://{args.host}:{args.port}" + (f" and {demo.share_url}" if args.share else
                                                           " (--share for a public gradio.live link)"), flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
