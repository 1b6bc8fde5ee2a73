"""AutoencoderKL against the official PyTorch outputs (vae.npz)."""

import jax
import numpy as np
import pytest

from cnc_jax.checkpoint import load_official_params
from cnc_jax.model_config import config_from_official_yaml
from cnc_jax.models.vae import AutoencoderKL, DiagonalGaussian
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw, rel_err

TOL = 1e-4
CHECKPOINTS = ("tiny_cnc.safetensors", "tiny_cnc.ckpt")


@pytest.fixture(scope="module")
def cnc_config(ref_dir):
    return config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))


@pytest.fixture(scope="module")
def vae(cnc_config):
    model = AutoencoderKL(cnc_config.vae)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    return model, encode, decode


@pytest.fixture(scope="module")
def vae_call(vae):
    """__call__ with and without rng, plus the posterior sample it should have decoded (one compile)."""
    model = vae[0]

    @jax.jit
    def run(params, image, rng):
        recon, post = model.apply({"params": params}, image)
        sampled, _ = model.apply({"params": params}, image, rng)
        return recon, sampled, post.sample(rng)

    return run


@pytest.fixture(scope="module", params=CHECKPOINTS)
def vae_params(request, ref_dir, cnc_config):
    params = load_official_params(ref_dir / request.param, cnc_config, ["vae"], skip_other_parts=True)
    return request.param, params["vae"]


def test_vae_parity(vae_params, vae, ref, cnc_config):
    source, params = vae_params
    _, encode, decode = vae
    r = ref("vae")
    scale = cnc_config.diffusion.scale_factor
    assert np.float32(scale) == r["scale_factor"]

    moments = encode(params, nchw_to_nhwc(r["image"]))
    post = DiagonalGaussian.from_moments(moments)
    encoding = scale * post.mode()
    ours = {
        "posterior_moments": moments,
        "posterior_mean": post.mean,
        "posterior_logvar": post.logvar,
        "posterior_std": post.std,
        "decode_raw": decode(params, nchw_to_nhwc(r["z"])),
        "decode_first_stage": decode(params, nchw_to_nhwc(r["z"]) / scale),
        "first_stage_encoding_of_mean": encoding,
        "recon_from_mean": decode(params, encoding / scale),
    }
    for name, value in ours.items():
        check_parity(f"vae[{source}]", name, nhwc_to_nchw(value), r[name])


def test_call_reconstructs_from_posterior(vae_params, vae, vae_call, ref):
    """__call__ without rng decodes the posterior mean; with rng it decodes mean + std * noise."""
    _, params = vae_params
    recon, sampled, z = vae_call(params, nchw_to_nhwc(ref("vae")["image"]), jax.random.key(3))
    assert rel_err(nhwc_to_nchw(recon), ref("vae")["recon_from_mean"]) <= TOL
    np.testing.assert_allclose(sampled, vae[2](params, z), rtol=1e-5, atol=1e-5)


def test_posterior_sampling():
    rng = jax.random.key(7)
    moments = 40.0 * np.random.default_rng(0).standard_normal((2, 3, 5, 8), np.float32)
    mean, logvar = np.split(moments, 2, axis=-1)
    logvar = np.clip(logvar, -30.0, 20.0)
    assert logvar.min() == -30.0 and logvar.max() == 20.0  # the clamp is exercised

    @jax.jit
    def run(m):
        post = DiagonalGaussian.from_moments(m)
        return post, post.mode(), post.std, post.sample(rng), post.sample(jax.random.key(8)), \
            jax.random.normal(rng, post.mean.shape)

    post, mode, std, sample, other, noise = run(moments)
    np.testing.assert_array_equal(post.mean, mean)
    np.testing.assert_array_equal(mode, mean)
    np.testing.assert_array_equal(post.logvar, logvar)
    np.testing.assert_allclose(std, np.exp(0.5 * logvar), rtol=1e-6)
    np.testing.assert_allclose(sample, mean + np.exp(0.5 * logvar) * noise, rtol=1e-5, atol=1e-6)
    assert not np.allclose(other, sample)
