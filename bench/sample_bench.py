"""Sampling benchmark: one guided step as the scan runs it (CnC.denoise: UNet + local fuser, both CFG branches
in one batch; the step-invariant conditions computed once, timed apart), optionally the same step before the
hoisting (the whole CnC apply per step), and the whole compiled loop of a sampler at a step count (time per
image), with random weights. One JSON line on stdout.

  python bench/sample_bench.py --config cnc_v1 --size 512 --batch 1 --steps 0 --unhoisted
  python bench/sample_bench.py --config cnc_v1 --size 512 --sampler dpmpp_2m --steps 20
  python bench/sample_bench.py --config ../shared/reference/tiny_cnc_config.yaml --size 128 --batch 2
"""

from __future__ import annotations

import argparse
import time

import common

from cnc_jax.sampling.sampler_names import SAMPLER_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim", help="sampler of the whole loop")
    parser.add_argument("--steps", type=int, default=5, help="steps of the whole-loop measurement (0: skip)")
    parser.add_argument("--unhoisted", action="store_true",
                        help="also time the step with the conditions recomputed inside it (before the hoisting)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--vae-repeats", type=int, default=0,
                        help="also time the VAE decode of the batch's latents this many times (0: skip)")
    parser.add_argument("--profile", action="store_true", help="trace one more step: time per part of the step")
    args = parser.parse_args()
    common.setup_backend(args)
    from cnc_jax.models.attention_kernels import resolve

    args.attention = resolve(args.attention)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnc_jax.model_config import load_config
    from cnc_jax.models import attention_kernels
    from cnc_jax.models.build import DIFFUSION_PARTS, init_params, parts_of
    from cnc_jax.models.cnc import CnC
    from cnc_jax.sampling.ddim import classifier_free_guidance, ddim_step
    from cnc_jax.sampling.guided import Conditions, batch_conditions, denoise_fn, sample_latents
    from cnc_jax.sampling.samplers import get_sampler, sampler_arrays

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
    latent = (h // 8, w // 8, config.unet.in_channels)

    def step_fns(attention):
        """(hoisted step (params, conditions, x, step), unhoisted step (params, cond, x, step)) for an attention."""
        model = CnC(config, dtype=jnp.dtype(dtype), attention=attention)

        def full_eps(params, cond):  # the step before the hoisting: the whole CnC apply, conditions included
            both = jax.tree_util.tree_map(lambda v: jnp.concatenate([v, v]), cond)
            context = jnp.concatenate([cond.text_context, cond.uncond_context])
            return classifier_free_guidance(lambda x, t: model.apply(
                {"params": params}, x, t, context, fg_depth=both.fg_depth, bg_depth=both.bg_depth,
                fg_emb=both.fg_emb, bg_emb=both.bg_emb, mask=both.mask, global_strength=both.global_strength),
                args.guidance)

        def step(eps_of):
            @jax.jit
            def guided_step(params, inputs, x, step):
                e = eps_of(params, inputs)(x, jnp.full((b,), step["timesteps"]))
                return ddim_step(x, e, step, jnp.zeros_like(x))[0]

            return guided_step

        return step(lambda params, prepared: denoise_fn(model, params, prepared, args.guidance, True)), step(full_eps)

    model = CnC(config, dtype=jnp.dtype(dtype), attention=args.attention)
    conditions = jax.jit(lambda params, cond: batch_conditions(model, params, cond, use_guidance=True))
    one = {k: v[0] for k, v in sampler_arrays("ddim", config.diffusion, 50).items()}
    x = jnp.asarray(rng.standard_normal((b,) + latent).astype(np.float32))
    compiled_cond, cond_compile_s = common.compile_timed(conditions, params, cond)
    prepared = compiled_cond(params, cond)
    cond_s = common.median(common.time_calls(compiled_cond, (params, cond), args.repeats))
    (plain, plain_full), (hoisted, full) = step_fns("xla"), step_fns(args.attention)
    flops = common.model_flops(plain, params, prepared, x, one)
    compiled, compile_seconds = common.compile_timed(hoisted, params, prepared, x, one)
    times = common.time_calls(compiled, (params, prepared, x, one), args.repeats)
    step_s = common.median(times)
    record = {"bench": "sample", "config": args.config, "size": [h, w], "batch": b, "dtype": args.dtype,
              "attention": args.attention, "init_s": round(init_seconds, 2), "compile_s": round(compile_seconds, 2),
              "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
              "conditions_s_median": round(cond_s, 4), "conditions_compile_s": round(cond_compile_s, 2),
              "conditions_flops": common.model_flops(conditions, params, cond),
              "flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4)}
    peak = common.peak_tflops(args, args.dtype)
    if peak:
        record.update(peak_tflops=round(peak, 4), mfu=round(flops / step_s / 1e12 / peak, 4))
    if args.profile:
        record["profile"] = common.thunk_profile(compiled, (params, prepared, x, one), common.op_category)
    if args.unhoisted:
        compiled_full, full_compile = common.compile_timed(full, params, cond, x, one)
        full_times = common.time_calls(compiled_full, (params, cond, x, one), args.repeats)
        record.update(unhoisted_step_s_median=round(common.median(full_times), 4),
                      unhoisted_step_s_all=[round(t, 4) for t in full_times],
                      unhoisted_compile_s=round(full_compile, 2),
                      unhoisted_flops_per_step=common.model_flops(plain_full, params, cond, x, one))
    if args.steps:
        keys = jax.random.split(jax.random.PRNGKey(0), b)
        arrays = sampler_arrays(args.sampler, config.diffusion, args.steps)
        run = lambda: sample_latents(config, params, cond, keys, arrays, args.guidance, use_guidance=True,  # noqa: E731
                                     latent_shape=latent, dtype=dtype, attention=args.attention,
                                     sampler=args.sampler)
        start = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - start
        loop = common.median(common.time_calls(lambda: run(), (), max(1, args.repeats - 2)))
        record.update({"sampler": args.sampler, "diffusers": get_sampler(args.sampler).diffusers_class,
                       "loop_steps": args.steps, "model_calls": len(arrays["timesteps"]),
                       "loop_first_call_s": round(first, 2), "loop_s": round(loop, 3),
                       "seconds_per_image": round(loop / b, 3), "images_per_s": round(b / loop, 4)})
    if args.attention == "dot_product":
        record["dot_product_kernels"] = attention_kernels.traced_choices()
    if args.vae_repeats:
        record.update(vae_decode(config, dtype, x, args.vae_repeats, args.profile))
    record.update(common.peak_memory_gb())
    common.report(record)


def vae_decode(config, dtype: str, latents, repeats: int, profile: bool = False) -> dict:
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
    record = {"vae_decode_compile_s": round(compile_seconds, 2), "vae_decode_s_median": round(common.median(times), 4),
              "vae_decode_s_all": [round(t, 4) for t in times], "vae_decode_flops": flops}
    if profile:
        record["vae_decode_profile"] = common.thunk_profile(compiled, (params, latents), common.vae_op_category)
    return record


if __name__ == "__main__":
    main()
