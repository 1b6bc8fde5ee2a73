"""Every self-attention implementation against the plain one (fp32 <= 1e-5), and end to end in the model;
bf16 compute against the fp32 references (the measured bounds are the ones stated in the README)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.checkpoint import load_official_params
from cnc_jax.model_config import config_from_official_yaml
from cnc_jax.models import attention_kernels as ak
from cnc_jax.models.cnc import CnC
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw, rel_err


def _qkv(b, n, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("impl,n", [("dot_product", 300), ("chunked", 2500), ("chunked", 700), ("splash", 256)])
def test_implementations_match_plain_attention(impl, n):
    q, k, v = _qkv(2, n, 2, 40)
    scale = 40 ** -0.5
    ours = jax.jit(lambda q, k, v: ak.self_attention(q, k, v, scale, impl))(q, k, v)
    check_parity("attention kernels", f"{impl} n={n}", ours, ak.xla_attention(q, k, v, scale), tol=1e-5)


def test_chunked_gradients_match_plain_attention():
    """The checkpointed chunks with their post-normalised softmax differentiate like the plain softmax."""
    q, k, v = _qkv(1, 700, 2, 40, seed=1)
    target = _qkv(1, 700, 2, 40, seed=2)[0]
    scale = 40 ** -0.5

    def loss(impl, q, k, v):
        return jnp.sum(jnp.tanh(impl(q, k, v, scale)) * target)

    ours = jax.jit(jax.grad(lambda *a: loss(ak.chunked_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    plain = jax.grad(lambda *a: loss(ak.xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, plain):
        assert rel_err(a, b) <= 1e-5


def test_chunked_never_materialises_all_scores():
    """The largest intermediate of 'chunked' is one chunk's logits, not (B, H, N, N)."""
    q, k, v = _qkv(1, 4096, 2, 8)
    text = jax.jit(lambda q, k, v: ak.chunked_attention(q, k, v, 1.0, chunk=512)).lower(q, k, v).as_text()
    assert "4096x4096" not in text and "512x4096" in text


@pytest.fixture(scope="module")
def tiny(ref_dir):
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    params = load_official_params(ref_dir / "tiny_cnc.ckpt", config, ["unet", "local_fuser", "global_fuser"],
                                  skip_other_parts=True)
    return config, params


def _eps(config, params, r, **module_options):
    model = CnC(config, **module_options)
    return jax.jit(lambda p: model.apply(
        {"params": p}, nchw_to_nhwc(r["x_noisy"]), r["t"], r["context"], nchw_to_nhwc(r["fg_depth"]),
        nchw_to_nhwc(r["bg_depth"]), r["fg_emb"], r["bg_emb"], nchw_to_nhwc(r["mask"]),
        global_strength=r["global_strength_gs1"]))(params)


@pytest.mark.parametrize("impl", ["dot_product"])  # 'chunked' equals 'xla' below its chunk size (16² maps here)
def test_model_with_each_implementation(tiny, ref, impl):
    config, params = tiny
    r = ref("cnc_apply_model")
    check_parity(f"cnc eps, attention={impl}", "eps_gs1", nhwc_to_nchw(_eps(config, params, r, attention=impl)),
                 r["eps_gs1"])


BF16_EPS_BOUND = 3e-2  # measured 2.0e-2 on the tiny reference model (README: bf16 parity)


def test_bfloat16_compute_stays_close(tiny, ref):
    config, params = tiny
    r = ref("cnc_apply_model")
    eps = _eps(config, params, r, dtype=jnp.bfloat16)
    assert eps.dtype == jnp.bfloat16
    err = rel_err(nhwc_to_nchw(eps.astype(jnp.float32)), r["eps_gs1"])
    print(f"bf16 eps_gs1 relative error {err:.2e}")
    assert 1e-4 < err <= BF16_EPS_BOUND  # really computed in bf16, and still close


def test_auto_picks_per_backend():
    assert ak.resolve("auto") == ak.AUTO[jax.default_backend()]
    assert ak.resolve("chunked") == "chunked"
    with pytest.raises(ValueError, match="not one of"):
        ak.resolve("flash")


def test_dot_product_selects_cudnn_only_where_jax_supports_it():
    """The selection rule alone (no GPU needed): GPU + bf16/fp16 + head dim % 8 == 0, <= 128 (<= 256 on sm >= 9.0)."""
    choice = ak.dot_product_choice
    assert choice("gpu", jnp.bfloat16, 40, (8, 0)) == "cudnn"  # SD 1.5's first level
    assert choice("gpu", jnp.float16, 128, (8, 6)) == "cudnn"
    assert choice("gpu", jnp.bfloat16, 160, (8, 0)) == "xla"  # SD 1.5's deepest levels before Hopper
    assert choice("gpu", jnp.bfloat16, 160, (9, 0)) == "cudnn"
    assert choice("gpu", jnp.bfloat16, 264, (9, 0)) == "xla"
    assert choice("gpu", jnp.bfloat16, 4, (9, 0)) == "xla"  # the tiny test configs' head dim
    assert choice("gpu", jnp.float32, 40, (9, 0)) == "xla"
    assert choice("cpu", jnp.bfloat16, 40) == "xla" and choice("tpu", jnp.bfloat16, 40) == "xla"
    q, k, v = _qkv(1, 64, 2, 8)
    jax.jit(lambda q, k, v: ak.self_attention(q, k, v, 0.3, "dot_product"))(q, k, v)
    assert ak.traced_choices()["64x64 h2 d8 float32"] == "xla"  # and what ran is recorded
