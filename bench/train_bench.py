"""Training benchmark: one step of the official recipe (frozen VAE/text encoder inside unless --cached, AdamW on
the stage's trainable leaves), random weights and a random batch, over a (data, fsdp) mesh. One JSON line.

  python bench/train_bench.py --config cnc_v1 --size 512 --batch 1
  python bench/train_bench.py --config local_fuser_v1 --size 512 --batch 4 --remat --mesh 1 4
"""

from __future__ import annotations

import argparse
import resource
import time

import common

from cnc_jax.cli import host_memory  # first cnc_jax import: the training command's host allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--remat", action="store_true", help="rematerialise the trainable blocks")
    parser.add_argument("--cached", action="store_true", help="batch carries VAE moments + text embeddings")
    parser.add_argument("--sd-unlocked", action="store_true", help="also train the UNet output blocks")
    parser.add_argument("--mesh", type=int, nargs=2, default=(-1, 1), metavar=("DATA", "FSDP"))
    parser.add_argument("--profile", action="store_true", help="trace one more step: time per part of the step")
    args = parser.parse_args()
    common.setup_backend(args)
    from cnc_jax.models.attention_kernels import resolve

    args.attention = resolve(args.attention)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnc_jax import sharding as sh
    from cnc_jax.model_config import load_config
    from cnc_jax.models.build import abstract_params, count_params, init_params
    from cnc_jax.models.parts import split_params
    from cnc_jax.training.state import TrainState, make_optimizer
    from cnc_jax.training.step import make_train_step

    config = load_config(args.config)
    h, w = common.image_hw(args)
    b = args.batch
    mesh = sh.make_mesh(*args.mesh)
    start = time.perf_counter()
    params = init_params(config, seed=0)
    init_seconds = time.perf_counter() - start
    sd_locked = not args.sd_unlocked
    trainable, frozen = split_params(config, params, sd_locked)
    boxed_trainable, boxed_frozen = split_params(config, abstract_params(config, boxed=True), sd_locked)
    frozen = jax.device_put(frozen, sh.param_shardings(boxed_frozen, mesh))
    tx, _ = make_optimizer(1e-5)
    state = TrainState.create(jax.device_put(trainable, sh.param_shardings(boxed_trainable, mesh)), tx,
                              jax.random.PRNGKey(0))
    trainable_count = count_params(trainable)
    del params, trainable  # keep only the device copies (on CPU the host copies would double the memory)

    rng = np.random.default_rng(0)
    L, C = config.text_encoder.max_position_embeddings, config.unet.context_dim
    batch = {"fg_depth": rng.random((b, h, w, 3), np.float32), "bg_depth": rng.random((b, h, w, 3), np.float32),
             "fg_emb": rng.standard_normal((b, C)).astype(np.float32),
             "bg_emb": rng.standard_normal((b, C)).astype(np.float32),
             "mask": (rng.random((b, h, w, 1)) > 0.5).astype(np.float32)}
    if args.cached:
        batch["latent_moments"] = rng.standard_normal((b, h // 8, w // 8, 2 * config.vae.embed_dim)).astype(np.float32)
        batch["text_embedding"] = rng.standard_normal((b, L, C)).astype(np.float32)
    else:
        batch["image"] = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
        batch["input_ids"] = rng.integers(0, config.text_encoder.vocab_size, (b, L)).astype(np.int32)
    batch = {k: jax.device_put(v, sh.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    def step_fn(attention):
        return jax.jit(make_train_step(config, tx, dtype=dtype, remat=args.remat, attention=attention),
                       donate_argnums=(0,))

    flops = common.model_flops(step_fn("xla"), state, frozen, batch)
    compiled, compile_seconds = common.compile_timed(step_fn(args.attention), state, frozen, batch)
    times, faults, system = [], [], []
    for _ in range(args.repeats):
        usage, begin = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - usage.ru_minflt)
        system.append(round(after.ru_stime - usage.ru_stime, 2))
    step_s = common.median(times)
    held = sh.bytes_per_device({"params": state.params, "opt_state": state.opt_state})
    record = {"bench": "train", "config": args.config, "mode": config.mode, "size": [h, w], "batch": b,
              "dtype": args.dtype, "attention": args.attention, "remat": args.remat, "cached": args.cached,
              "sd_locked": sd_locked, "mesh": dict(mesh.shape), "trainable_params": trainable_count,
              "trainable_and_optimizer_gb_per_device": round(max(held.values()) / 1e9, 3),
              "init_s": round(init_seconds, 2), "compile_s": round(compile_seconds, 2),
              "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
              "host_malloc": host_memory.PLAN, "step_minor_faults": faults, "step_system_s": system,
              "flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4),
              "loss": float(metrics["loss"])}
    peak = common.peak_tflops(args, args.dtype)
    if peak:
        record.update(peak_tflops=round(peak, 4), mfu=round(flops / step_s / 1e12 / peak, 4))
    record.update(common.peak_memory_gb())
    if args.profile:
        record["profile"] = common.thunk_profile(compiled, (state, frozen, batch), common.op_category)
    common.report(record)


if __name__ == "__main__":
    main()
