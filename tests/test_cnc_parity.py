"""Parity of the CnC diffusion model (UNet + local fuser + global fuser) with the official outputs.

Configs come from the official-style YAMLs of the reference folder; weights are read by our own
checkpoint reader and converted through the one name table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.checkpoint import load_official_params
from cnc_jax.model_config import config_from_official_yaml
from cnc_jax.models.attention import foreground_mask
from cnc_jax.models.cnc import CnC
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw


def _load(ref_dir, yaml_name, ckpt_name):
    config = config_from_official_yaml(str(ref_dir / yaml_name))
    parts = ["unet"] + ["local_fuser"] * config.has_local + ["global_fuser"] * config.has_global
    params = load_official_params(ref_dir / ckpt_name, config, parts, skip_other_parts=True)
    return config, params


def _inputs(ref):
    return dict(x=nchw_to_nhwc(ref["x_noisy"]), timesteps=ref["t"], text_context=ref["context"])


def _conditions(cnc_ref):
    return dict(fg_depth=nchw_to_nhwc(cnc_ref["fg_depth"]), bg_depth=nchw_to_nhwc(cnc_ref["bg_depth"]),
                fg_emb=cnc_ref["fg_emb"], bg_emb=cnc_ref["bg_emb"], mask=nchw_to_nhwc(cnc_ref["mask"]))


@pytest.fixture(scope="module", params=["tiny_cnc.ckpt", "tiny_cnc.safetensors"])
def cnc_model(request, ref_dir):
    config, params = _load(ref_dir, "tiny_cnc_config.yaml", request.param)
    return request.param, CnC(config), params


def _eps_fn(model):
    return jax.jit(lambda p, gs, kw: model.apply({"params": p}, global_strength=gs, **kw))


def test_cnc_eps_every_strength_and_mask(cnc_model, ref):
    name, model, params = cnc_model
    r = ref("cnc_apply_model")
    kw = {**_inputs(r), **_conditions(r)}
    eps = _eps_fn(model)
    for case in ("gs1", "gs2"):
        out = eps(params, r[f"global_strength_{case}"], kw)
        check_parity(f"cnc_apply_model[{name}]", f"eps_{case}", nhwc_to_nchw(out), r[f"eps_{case}"])
    for case, fill in (("mask_ones", 1.0), ("mask_zeros", 0.0)):
        # global_strength is the (fg, bg) pair [1, 1] here, not a per-image value: 2 is not the batch size
        out = eps(params, np.ones(2, np.float32), {**kw, "mask": np.full_like(kw["mask"], fill)})
        check_parity(f"cnc_apply_model[{name}]", f"eps_{case}", nhwc_to_nchw(out), r[f"eps_{case}"])


def test_cnc_intermediates(cnc_model, ref):
    name, model, params = cnc_model
    r = ref("cnc_apply_model")
    cond = _conditions(r)
    group = f"cnc_apply_model[{name}]"
    apply = lambda method, *a, **k: model.apply({"params": params}, *a, method=method, **k)
    tokens = apply(CnC.global_tokens, cond["fg_emb"], cond["bg_emb"])
    check_parity(group, "global_tokens", tokens, r["global_tokens"])
    for case in ("gs1", "gs2"):
        ctx = apply(CnC.context, r["context"], cond["fg_emb"], cond["bg_emb"], r[f"global_strength_{case}"])
        check_parity(group, f"unet_context_{case}", ctx, r[f"unet_context_{case}"])
    ctx = apply(CnC.context, r["context"], cond["fg_emb"], cond["bg_emb"], r["global_strength_gs1"])
    controls, features = apply(CnC.controls, nchw_to_nhwc(r["x_noisy"]), r["t"], ctx, cond["fg_depth"],
                               cond["bg_depth"], cond["mask"], return_features=True)
    for i, f in enumerate(features):
        check_parity(group, f"feature_{i}", nhwc_to_nchw(f), r[f"feature_{i}"])
    assert len(controls) == len([k for k in r if k.startswith("control_")])
    for i, c in enumerate(controls):
        check_parity(group, f"control_{i:02d}", nhwc_to_nchw(c), r[f"control_{i:02d}"])


def test_soft_guidance_masks_at_every_resolution(ref):
    r = ref("cnc_apply_model")
    mask = nchw_to_nhwc(r["mask"])
    sizes = sorted(int(k.rsplit("_", 1)[1]) for k in r if k.startswith("mask_resized_bool_"))
    assert sizes, "reference has no resized masks"
    for s in sizes:
        ours = np.asarray(foreground_mask(mask, (s, s))).reshape(-1, 1, s, s)
        expected = r[f"mask_resized_bool_{s}"]
        assert ours.shape == expected.shape
        mismatches = int(np.sum(ours != expected))
        assert mismatches == 0, f"{mismatches} pixels of the {s}x{s} foreground mask differ"


def test_local_mode(ref_dir, ref):
    config, params = _load(ref_dir, "tiny_local_config.yaml", "tiny_local.ckpt")
    assert config.mode == "local" and set(params) == {"unet", "local_fuser"}
    model = CnC(config)
    r, c = ref("local_apply_model"), ref("cnc_apply_model")
    cond = _conditions(c)
    kw = {**_inputs(r), "fg_depth": cond["fg_depth"], "bg_depth": cond["bg_depth"]}
    eps = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(params, kw)
    check_parity("local_apply_model", "eps", nhwc_to_nchw(eps), r["eps"])
    controls, features = model.apply({"params": params}, kw["x"], kw["timesteps"], kw["text_context"],
                                     kw["fg_depth"], kw["bg_depth"], return_features=True, method=CnC.controls)
    for i, f in enumerate(features):
        check_parity("local_apply_model", f"feature_{i}", nhwc_to_nchw(f), r[f"feature_{i}"])
    for i, ctl in enumerate(controls):
        check_parity("local_apply_model", f"control_{i:02d}", nhwc_to_nchw(ctl), r[f"control_{i:02d}"])


def test_global_mode(ref_dir, ref):
    config, params = _load(ref_dir, "tiny_global_config.yaml", "tiny_global.ckpt")
    assert config.mode == "global" and set(params) == {"unet", "global_fuser"}
    model = CnC(config)
    r, c = ref("global_apply_model"), ref("cnc_apply_model")
    cond = _conditions(c)
    kw = {**_inputs(r), "fg_emb": r["fg_emb"], "bg_emb": r["bg_emb"], "mask": cond["mask"]}
    eps = _eps_fn(model)
    for case in ("gs1", "gs2"):
        out = eps(params, r[f"global_strength_{case}"], kw)
        check_parity("global_apply_model", f"eps_{case}", nhwc_to_nchw(out), r[f"eps_{case}"])
    out = eps(params, np.ones(2, np.float32), {**kw, "mask": np.ones_like(kw["mask"])})  # (fg, bg) = [1, 1]
    check_parity("global_apply_model", "eps_mask_ones", nhwc_to_nchw(out), r["eps_mask_ones"])
    tokens = model.apply({"params": params}, r["fg_emb"], r["bg_emb"], method=CnC.global_tokens)
    check_parity("global_apply_model", "global_tokens", tokens, r["global_tokens"])


def test_mode_inputs_are_checked(ref_dir):
    config, params = _load(ref_dir, "tiny_global_config.yaml", "tiny_global.ckpt")
    model = CnC(config)
    x = jnp.zeros((1, config.latent_size, config.latent_size, config.unet.in_channels))
    with pytest.raises(ValueError, match="needs fg_emb, bg_emb"):
        model.apply({"params": params}, x, jnp.zeros((1,), jnp.int32),
                    jnp.zeros((1, config.text_encoder.max_position_embeddings, config.unet.context_dim)))


def test_non_square_latents_with_soft_guidance(ref_dir, ref):
    """A non-square latent (e.g. 16x24, a 128x192 image): every map keeps its own aspect; the mask still steers
    the tokens."""
    config, params = _load(ref_dir, "tiny_cnc_config.yaml", "tiny_cnc.safetensors")
    model = CnC(config)
    rng = np.random.default_rng(0)
    r = ref("cnc_apply_model")
    b, _, h, _ = r["x_noisy"].shape
    w = h + 2 ** (len(config.unet.channel_mult) - 1)  # wider by one pixel of the deepest level: non-square
    kw = dict(x=rng.standard_normal((b, h, w, 4)).astype(np.float32), timesteps=r["t"], text_context=r["context"],
              fg_depth=rng.random((b, 8 * h, 8 * w, 3), np.float32), bg_depth=rng.random((b, 8 * h, 8 * w, 3), np.float32),
              fg_emb=r["fg_emb"], bg_emb=r["bg_emb"])
    left = np.zeros((b, 8 * h, 8 * w, 1), np.float32)
    left[:, :, : 4 * w] = 1.0
    eps = jax.jit(lambda p, mask: model.apply({"params": p}, mask=mask, **kw))
    out_left, out_ones = eps(params, left), eps(params, np.ones_like(left))
    assert out_left.shape == (b, h, w, 4) and np.all(np.isfinite(out_left))
    diff = np.abs(np.asarray(out_left) - np.asarray(out_ones)).max(axis=(0, 3))
    assert diff[:, : w // 2].max() < diff[:, w // 2:].max()  # the background half differs most


def test_global_fuser_dropout_only_in_training(ref_dir, ref):
    config, params = _load(ref_dir, "tiny_global_config.yaml", "tiny_global.ckpt")
    model = CnC(config)
    r = ref("global_apply_model")
    tokens = lambda det, rng: model.apply({"params": params}, r["fg_emb"], r["bg_emb"], deterministic=det,
                                          rngs={"dropout": rng}, method=CnC.global_tokens)
    check_parity("global_apply_model", "global_tokens (eval, rng given)",
                 tokens(True, jax.random.PRNGKey(0)), r["global_tokens"])
    train_a, train_b = tokens(False, jax.random.PRNGKey(1)), tokens(False, jax.random.PRNGKey(2))
    assert not np.allclose(train_a, r["global_tokens"]) and not np.allclose(train_a, train_b)
