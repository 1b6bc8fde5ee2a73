"""Samplers vs diffusers 0.42 (scheduler_ref.npz / .json): every sampler at every step count of the reference,
driven through our scan bodies on the closed-form toy eps model; plus names, step counts and per-image noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.model_config import DiffusionConfig
from cnc_jax.sampling.samplers import SAMPLER_NAMES, SAMPLERS, get_sampler, sample_loop, sampler_arrays
from tests.conftest import check_parity

# Our `ddim` is the official LDM grid (tests/test_ddim.py); diffusers' DDIMScheduler with the reference's own
# config replays through the builder that also serves ddim_trailing.
REPLAY_WITH = {"ddim": "ddim_trailing"}
TOLERANCE = 1e-5


def _toy(arrays):
    """The README's toy: a = ac[round(t)]; eps = sqrt(1-a) x / (0.25 a + 1 - a) + 0.1 tanh(x.A + t/1000 b), NCHW."""
    A, b, ac = (jnp.asarray(arrays[k]) for k in ("A", "b", "toy_alphas_cumprod"))

    def eps(x, t):
        a = ac[jnp.round(t).astype(jnp.int32)][:, None, None, None]
        drift = jnp.einsum("bchw,cd->bdhw", x, A) + (t.astype(jnp.float32) / 1000)[:, None, None, None] * b[:, None, None]
        return jnp.sqrt(1 - a) * x / (0.25 * a + 1 - a) + 0.1 * jnp.tanh(drift)

    return eps


def _diffusion_config(conf: dict) -> DiffusionConfig:
    assert conf["beta_schedule"] == "scaled_linear" and conf["trained_betas"] is None
    return DiffusionConfig(timesteps=conf["num_train_timesteps"], linear_start=conf["beta_start"],
                           linear_end=conf["beta_end"])


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_matches_diffusers(sched_ref, name):
    arrays, meta = sched_ref
    assert name in meta["configs"], f"the reference has no {name}"
    conf = meta["configs"][name]
    builder = SAMPLERS[REPLAY_WITH.get(name, name)]
    settings = {k: conf[k] for k in builder.settings if k in conf}
    run = jax.jit(lambda x, steps, noise: sample_loop(_toy(arrays), builder.name, x, steps, noise=noise,
                                                      return_intermediates=True))
    x_T = jnp.asarray(arrays["noise"])
    assert x_T.shape == (meta["batch"], 4, meta["latent"], meta["latent"])
    for steps in meta["steps"]:
        key = f"{name}_S{steps}"
        plan = builder.plan(_diffusion_config(conf), steps, 0.0, settings)
        np.testing.assert_array_equal(plan["timesteps"], arrays[f"{key}_timesteps"])
        noise = arrays.get(f"{key}_noise")
        assert (noise is not None) == get_sampler(name).stochastic
        final, trace = run(x_T, {k: jnp.asarray(v) for k, v in plan.items()},
                           None if noise is None else jnp.asarray(noise))
        ref_x = arrays[f"{key}_x"]
        assert trace["x_inter"].shape[0] == ref_x.shape[0] + 1
        for i in range(ref_x.shape[0]):
            check_parity(f"sampler_{name}", f"S{steps}_x[{i}]", trace["x_inter"][i + 1], ref_x[i], TOLERANCE)
        check_parity(f"sampler_{name}", f"S{steps}_final", final, arrays[f"{key}_final"], TOLERANCE)


def test_sampler_names_mean_the_reference_configs(sched_ref):
    """Each name's defining settings are the reference's diffusers config for that name."""
    _, meta = sched_ref
    for name, sampler in SAMPLERS.items():
        if name in REPLAY_WITH:
            continue
        conf = meta["configs"][name]
        shared = {k: v for k, v in sampler.settings.items() if k in conf}
        assert shared == {k: conf[k] for k in shared}, name
        assert len(shared) >= 2, name


def test_step_counts():
    """Every step count diffusers can run: 1..1000, less where its own grid breaks (then a clear error)."""
    cfg = DiffusionConfig()
    largest = {"pndm": 999, "dpmpp_2m": 998, "dpmpp_2m_sde": 998, "unipc": 998}
    for name, sampler in SAMPLERS.items():
        for steps in (1, 2, 7, 500, largest.get(name, 1000)) if name != "ddim" else (1, 2, 7, 50):
            plan = sampler.plan(cfg, steps)
            assert all(np.all(np.isfinite(v)) for v in plan.values()), (name, steps)
            assert 0 <= plan["timesteps"].min() and plan["timesteps"].max() <= cfg.timesteps
            official = {7: 8}.get(steps, steps) if name == "ddim" else steps  # the official grid: 7 -> 8 steps
            assert len(plan["timesteps"]) == official + (name == "pndm" and steps > 1), (name, steps)
    with pytest.raises(ValueError, match="steps=1000: diffusers' PNDM grid would need timestep 1000"):
        SAMPLERS["pndm"].plan(cfg, 1000)
    with pytest.raises(ValueError, match="steps=999: the sigmas of this grid repeat"):
        SAMPLERS["dpmpp_2m"].plan(cfg, 999)  # the leading solver grid reaches t = 1000, whose sigma repeats t = 999
    with pytest.raises(ValueError, match="steps=61: diffusers' DDIM grid would need timestep -1"):
        SAMPLERS["ddim_trailing"].plan(cfg, 61)  # np.arange(1000, 0, -1000 / 61) overshoots to a 62nd point
    with pytest.raises(ValueError, match="eta"):
        SAMPLERS["unipc"].plan(cfg, 20, eta=0.5)
    with pytest.raises(ValueError, match="valid samplers: ddim, ddim_trailing"):
        get_sampler("dpm")


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic])
def test_stochastic_noise_is_per_image(name):
    """Image i's noise comes from its own key: the same image in another batch gets the same result."""
    steps = sampler_arrays(name, DiffusionConfig(), 4)
    eps = lambda x, t: 0.5 * x + 0.01 * t[:, None, None, None]  # noqa: E731
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 4, 4))
    run = jax.jit(lambda x, k: sample_loop(eps, name, x, steps, k))
    both, alone = run(x, keys), run(x[1:2], keys[1:2])
    np.testing.assert_array_equal(np.asarray(both[1:2]), np.asarray(alone))
    assert not np.allclose(both, run(x, keys[::-1]))  # and the noise does depend on the key


def test_manifest_sampler_field(tmp_path):
    from cnc_jax.sampling.jobs import JobError, parse_job

    assert parse_job({"prompt": "x"}, 1, str(tmp_path)).sampler == "ddim"
    spec = parse_job({"prompt": "x", "sampler": "unipc", "steps": 20}, 1, str(tmp_path))
    assert spec.sampler == "unipc" and spec.settings()["sampler"] == "unipc"  # job.json's settings name it
    with pytest.raises(JobError, match="field 'sampler': unknown sampler 'dpm'; valid samplers: ddim, ddim_trailing"):
        parse_job({"prompt": "x", "sampler": "dpm"}, 1, str(tmp_path))
    with pytest.raises(JobError, match="field 'eta': eta applies to the samplers ddim, ddim_trailing only"):
        parse_job({"prompt": "x", "sampler": "euler", "eta": 0.5}, 1, str(tmp_path))
