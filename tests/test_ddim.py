"""DDIM sampler: parity with the official sampler (ddim_sample.npz) and one compiled program per shape."""

import jax
import numpy as np
import pytest

from cnc_jax.checkpoint import load_official_params
from cnc_jax.diffusion import Schedule
from cnc_jax.model_config import config_from_official_yaml, load_config
from cnc_jax.models.vae import AutoencoderKL
from cnc_jax.sampling.ddim import DDIMSchedule
from cnc_jax.sampling.guided import Conditions, sample_latents
from cnc_jax.sampling.samplers import sampler_arrays
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw


@pytest.fixture(scope="module")
def tiny(ref_dir):
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    params = load_official_params(ref_dir / "tiny_cnc.ckpt", config)
    return config, params


def _conditions(r, strength, uncond=True):
    b = r["x_T"].shape[0]
    return Conditions(text_context=r["context"], uncond_context=r["uc_context"] if uncond else None,
                      fg_depth=nchw_to_nhwc(r["fg_depth"]), bg_depth=nchw_to_nhwc(r["bg_depth"]),
                      fg_emb=r["fg_emb"], bg_emb=r["bg_emb"], mask=nchw_to_nhwc(r["mask"]),
                      global_strength=np.broadcast_to(np.asarray(strength, np.float32), (b, 2)))


def _diffusion(params):
    return {k: params[k] for k in ("unet", "local_fuser", "global_fuser")}


def test_ddim_schedule_matches_official(tiny, ref):
    config, _ = tiny
    r = ref("ddim_sample")
    s = DDIMSchedule.make(Schedule.from_config(config.diffusion), len(r["ddim_timesteps"]), eta=0.0)
    np.testing.assert_array_equal(s.timesteps, r["ddim_timesteps"])
    np.testing.assert_array_equal(s.alphas, r["ddim_alphas"])
    np.testing.assert_array_equal(s.alphas_prev, r["ddim_alphas_prev"].astype(np.float32))
    np.testing.assert_array_equal(s.sqrt_one_minus_alphas, r["ddim_sqrt_one_minus_alphas"])


@pytest.mark.parametrize("guided", [True, False])
def test_ddim_sampling_parity(tiny, ref, guided):
    config, params = tiny
    r = ref("ddim_sample")
    steps = DDIMSchedule.make(Schedule.from_config(config.diffusion), len(r["ddim_timesteps"]), 0.0).arrays()
    x_T = nchw_to_nhwc(r["x_T"])
    # the official sampler drops global_strength at guidance 1: its no-CFG run used [1, 1]
    strength = r["global_strength"] if guided else [1.0, 1.0]
    keys = jax.random.split(jax.random.PRNGKey(0), x_T.shape[0])
    final, inter = sample_latents(config, _diffusion(params), _conditions(r, strength, guided), keys, steps,
                                  float(r["guidance_scale"]) if guided else 1.0, use_guidance=guided,
                                  latent_shape=x_T.shape[1:], return_intermediates=True, x_T=x_T)
    suffix = "" if guided else "_nocfg"
    group = "ddim_sample" + suffix
    check_parity(group, "samples" + suffix, nhwc_to_nchw(final), r["samples" + suffix])
    for k in range(inter["x_inter"].shape[0]):
        check_parity(group, f"x_inter{suffix}[{k}]", nhwc_to_nchw(inter["x_inter"][k]), r["x_inter" + suffix][k])
        if guided:
            check_parity(group, f"pred_x0[{k}]", nhwc_to_nchw(inter["pred_x0"][k]), r["pred_x0"][k])
    if guided:
        vae = AutoencoderKL(config.vae)
        decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z / config.diffusion.scale_factor,
                                                 method=AutoencoderKL.decode))(params["vae"], final)
        check_parity(group, "decoded", nhwc_to_nchw(decoded), r["decoded"])


B, H, W = 2, 4, 6  # batch and latent size of the random tiny model's programs


@pytest.fixture(scope="module")
def random_tiny():
    from cnc_jax.models.build import init_params

    config = load_config("tiny")
    return config, init_params(config, seed=0, parts=["unet", "local_fuser", "global_fuser"])


def cond(seed, b=B, h=H, w=W):
    r = np.random.default_rng(seed)
    return Conditions(text_context=r.standard_normal((b, 77, 32), np.float32),
                      uncond_context=r.standard_normal((b, 77, 32), np.float32),
                      fg_depth=r.random((b, 8 * h, 8 * w, 3), np.float32),
                      bg_depth=r.random((b, 8 * h, 8 * w, 3), np.float32),
                      fg_emb=r.standard_normal((b, 32), np.float32), bg_emb=r.standard_normal((b, 32), np.float32),
                      mask=(r.random((b, 8 * h, 8 * w, 1)) > 0.5).astype(np.float32),
                      global_strength=r.random((b, 2)).astype(np.float32))


def _scan_bodies(jaxpr):
    """Every lax.scan body inside a (closed) jaxpr, searched through nested calls."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["jaxpr"].jaxpr
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _scan_bodies(inner)


def test_step_invariant_work_is_outside_the_loop(random_tiny):
    """The loop body never touches image-resolution features: the depth maps' feature extractor (and the global
    fuser, the context) run once before the scan; only the soft-guidance mask (1 channel) is read per step."""
    config, params = random_tiny
    closed = jax.make_jaxpr(lambda p, c, k, s: sample_latents(
        config, p, c, k, s, 7.5, use_guidance=True, latent_shape=(H, W, 4), sampler="unipc"))(
        params, cond(0), jax.random.split(jax.random.PRNGKey(0), B), sampler_arrays("unipc", config.diffusion, 3))
    bodies = list(_scan_bodies(closed.jaxpr))
    loop = max(bodies, key=lambda j: len(j.eqns))  # the sampler's scan (chunked attention has small inner ones)
    computed = {tuple(v.aval.shape) for e in loop.eqns for v in e.outvars if hasattr(v.aval, "shape")}
    assert not [s for s in computed if len(s) == 4 and s[1:3] == (8 * H, 8 * W) and s[-1] != 1]  # no depth stem
    assert not [s for s in computed if len(s) == 4 and s[1:3] == (2 * H, 2 * W)]  # nor its /4 stage
    tokens = (2 * B, 2 * config.global_fuser.num_tokens, config.unet.context_dim)  # the global fuser's output
    context = (2 * B, 77 + tokens[1], config.unet.context_dim)
    joined = {tuple(v.aval.shape) for e in loop.eqns if e.primitive.name == "concatenate" for v in e.outvars}
    assert tokens not in computed and context not in joined  # text + global tokens are joined once, before
    assert any(len(s) == 4 and s[1:3] == (H, W) for s in computed)  # while the UNet does run per step


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde"])
def test_sampler_is_one_program_compiled_once_per_shape(random_tiny, sampler):
    """DDIM and a stochastic multistep solver (its previous data prediction in the scan carry)."""
    config, params = random_tiny
    b, h, w = B, H, W
    kw = dict(use_guidance=True, latent_shape=(h, w, 4), sampler=sampler)

    def arrays(steps, eta):
        return sampler_arrays(sampler, config.diffusion, steps, eta)

    lowered = {s: sample_latents.lower(config, params, cond(0), jax.random.split(jax.random.PRNGKey(0), b),
                                       arrays(s, 0.0), 7.5, **kw).as_text()
               for s in (5, 10)}
    for text in lowered.values():
        assert "stablehlo.while" in text  # the loop is a device loop ...
        assert "callback" not in text.lower()  # ... with no host round-trips
    assert abs(len(lowered[10]) - len(lowered[5])) < 0.02 * len(lowered[5])  # not unrolled per step

    before = sample_latents._cache_size()
    eta = 1.0 if sampler == "ddim" else 0.0  # eta is a DDIM setting
    outs = []
    for seed, (scale, e) in enumerate([(7.5, 0.0), (3.0, 0.0), (9.0, eta)]):
        keys = jax.random.split(jax.random.PRNGKey(seed), b)
        outs.append(sample_latents(config, params, cond(seed), keys, arrays(5, e), scale, **kw))
    assert np.all(np.isfinite(outs[-1])) and not np.allclose(outs[0], outs[1])
    assert sample_latents._cache_size() == before + 1  # new prompt / seed / scale / eta / strength: no retrace
    sample_latents(config, params, cond(0), keys, arrays(10, 0.0), 7.5, **kw)
    assert sample_latents._cache_size() == before + 2  # a new step count is a new shape


def test_step_counts_follow_the_official_grid():
    schedule = Schedule.from_config(load_config("tiny").diffusion)
    assert len(DDIMSchedule.make(schedule, 7).timesteps) == 8  # 1000 // 7 = 142 -> 8 steps, as the official sampler
    assert len(DDIMSchedule.make(schedule, 50).timesteps) == 50
    with pytest.raises(ValueError, match="steps=3"):
        DDIMSchedule.make(schedule, 3)  # 1000 // 3 = 333 -> timestep 1000 does not exist
