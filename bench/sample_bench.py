"""Sampling benchmark: one guided DDIM step (UNet + local fuser + global fuser, both CFG branches in one batch)
and the whole compiled DDIM loop, with random weights. One JSON line on stdout.

  python bench/sample_bench.py --config cnc_v1 --size 512 --batch 1 --steps 5
  python bench/sample_bench.py --config ../shared/reference/tiny_cnc_config.yaml --size 128 --batch 2
"""

from __future__ import annotations

import argparse
import time

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps of the whole-loop measurement (0: skip)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--vae-repeats", type=int, default=0,
                        help="also time the VAE decode of the batch's latents this many times (0: skip)")
    args = parser.parse_args()
    common.setup_backend(args)
    from cnc_jax.models.attention_kernels import resolve

    args.attention = resolve(args.attention)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnc_jax.config import load_config
    from cnc_jax.diffusion import Schedule
    from cnc_jax.models.build import DIFFUSION_PARTS, init_params, parts_of
    from cnc_jax.models.cnc import CnC
    from cnc_jax.sampling.ddim import DDIMSchedule, ddim_step
    from cnc_jax.sampling.sampler import Conditions, cnc_eps_fn, sample_latents

    config = load_config(args.config)
    h, w = common.image_hw(args)
    b, dtype = args.batch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    start = time.perf_counter()
    parts = [p for p in parts_of(config) if p in DIFFUSION_PARTS]
    params = jax.device_put(init_params(config, seed=0, parts=parts))
    init_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    L, C = config.text_encoder.max_position_embeddings, config.unet.context_dim
    cond = Conditions(
        text_context=rng.standard_normal((b, L, C)).astype(np.float32),
        uncond_context=rng.standard_normal((b, L, C)).astype(np.float32),
        fg_depth=rng.random((b, h, w, 3), np.float32) if config.has_local else None,
        bg_depth=rng.random((b, h, w, 3), np.float32) if config.has_local else None,
        fg_emb=rng.standard_normal((b, C)).astype(np.float32) if config.has_global else None,
        bg_emb=rng.standard_normal((b, C)).astype(np.float32) if config.has_global else None,
        mask=(rng.random((b, h, w, 1)) > 0.5).astype(np.float32) if config.has_global else None,
        global_strength=np.ones((b, 2), np.float32) if config.has_global else None)
    schedule = Schedule.from_config(config.diffusion)
    latent = (h // 8, w // 8, config.unet.in_channels)

    def guided_step_fn(attention):
        model = CnC(config, dtype=jnp.dtype(dtype), attention=attention)

        @jax.jit
        def guided_step(params, cond, x, step):
            eps_fn = cnc_eps_fn(model, params, cond, args.guidance, use_guidance=True)
            return ddim_step(x, eps_fn(x, jnp.full((b,), step["timesteps"])), step, jnp.zeros_like(x))[0]

        return guided_step

    one = {k: v[0] for k, v in DDIMSchedule.make(schedule, 50).arrays().items()}
    x = jnp.asarray(rng.standard_normal((b,) + latent).astype(np.float32))
    flops = common.model_flops(guided_step_fn("xla"), params, cond, x, one)
    compiled, compile_seconds = common.compile_timed(guided_step_fn(args.attention), params, cond, x, one)
    times = common.time_calls(compiled, (params, cond, x, one), args.repeats)
    step_s = common.median(times)
    record = {"bench": "sample", "config": args.config, "size": [h, w], "batch": b, "dtype": args.dtype,
              "attention": args.attention, "init_s": round(init_seconds, 2), "compile_s": round(compile_seconds, 2),
              "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
              "flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4)}
    peak = common.peak_tflops(args, args.dtype)
    if peak:
        record.update(peak_tflops=round(peak, 4), mfu=round(flops / step_s / 1e12 / peak, 4))
    if args.steps:
        keys = jax.random.split(jax.random.PRNGKey(0), b)
        ddim = DDIMSchedule.make(schedule, args.steps).arrays()
        run = lambda: sample_latents(config, params, cond, keys, ddim, args.guidance, use_guidance=True,  # noqa: E731
                                     latent_shape=latent, dtype=dtype, attention=args.attention)
        start = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - start
        loop = common.median(common.time_calls(lambda: run(), (), max(1, args.repeats - 2)))
        record.update({"loop_steps": args.steps, "loop_first_call_s": round(first, 2), "loop_s": round(loop, 3),
                       "images_per_s": round(b / loop, 4)})
    if args.vae_repeats:
        record.update(vae_decode(config, dtype, x, args.vae_repeats))
    record.update(common.peak_memory_gb())
    common.report(record)


def vae_decode(config, dtype: str, latents, repeats: int) -> dict:
    """The pipeline's last stage: decode (B, h/8, w/8, 4) latents to images, random VAE weights."""
    import jax
    import jax.numpy as jnp

    from cnc_jax.models.build import init_params
    from cnc_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL(config.vae, dtype=jnp.dtype(dtype))
    params = jax.device_put(init_params(config, seed=0, parts=["vae"])["vae"])
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
    flops = common.model_flops(decode, params, latents)
    compiled, compile_seconds = common.compile_timed(decode, params, latents)
    times = common.time_calls(compiled, (params, latents), repeats)
    return {"vae_decode_compile_s": round(compile_seconds, 2), "vae_decode_s_median": round(common.median(times), 4),
            "vae_decode_s_all": [round(t, 4) for t in times], "vae_decode_flops": flops}


if __name__ == "__main__":
    main()
