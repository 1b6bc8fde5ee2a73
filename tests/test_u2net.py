"""U²-Net (U2NET / U2NETP) against the official PyTorch outputs (u2netp.npz), its checkpoint mapping
(u2net_schema.json), and the GetSODMask procedure (cnc_jax.annotators.saliency)."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from cnc_jax.annotators import saliency
from cnc_jax.annotators.saliency import SaliencyMasker, bilinear_aa_matrix, resize_mask, saliency_mask
from cnc_jax.checkpoint import convert_state_dict
from cnc_jax.checkpoint.convert import plan_conversion
from cnc_jax.models.resize import bilinear_matrix
from cnc_jax.models.u2net import (U2Net, U2NetConfig, abstract_params, count_params, detect_config, detect_variant,
                                  max_pool_ceil)
from cnc_jax.torchfile.state_dict import detect_format, load_state_dict
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw

CHECKPOINTS = {"tiny_u2netp.pth": "torch_zip", "tiny_u2netp_legacy.pth": "torch_legacy"}
U2NETP = U2NetConfig("u2netp")


@pytest.fixture(scope="module")
def apply_u2netp():
    """One jitted forward for every U2NETP params tree (compiles once per input shape)."""
    return jax.jit(lambda params, x: U2Net(U2NETP).apply({"params": params}, x))


@pytest.fixture(scope="module")
def loaded(ref_dir):
    """{file: (state dict, converted params)} for both storage formats of the tiny U2NETP."""
    out = {}
    for name in CHECKPOINTS:
        sd = load_state_dict(ref_dir / name)
        params, report = convert_state_dict(sd, {"u2net": abstract_params(U2NETP)}, source=name)
        assert report.ok
        out[name] = (sd, params["u2net"])
    return out


@pytest.fixture(scope="module")
def params(loaded):
    return loaded["tiny_u2netp.pth"][1]


# ------------------------------------------------------------------ model parity


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_u2netp_parity(name, ref_dir, loaded, ref, apply_u2netp):
    assert detect_format(ref_dir / name) == CHECKPOINTS[name]
    sd, params = loaded[name]
    assert detect_variant(sd) == "u2netp"
    assert detect_config(sd) == U2NETP
    # fp16 parameters are cast to float32 exactly; BatchNorm statistics arrive float32
    w = sd["stage1.rebnconvin.conv_s1.weight"].numpy()
    assert w.dtype == np.float16 and sd["stage1.rebnconvin.bn_s1.running_var"].numpy().dtype == np.float32
    kernel = params["stage1"]["rebnconvin"]["conv_s1"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, w.astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["stage1"]["rebnconvin"]["bn_s1"]["var"],
                                  sd["stage1.rebnconvin.bn_s1.running_var"].numpy())
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))

    r = ref("u2netp")
    outs = apply_u2netp(params, nchw_to_nhwc(r["input"]))
    assert len(outs) == 7
    for i, out in enumerate(outs):
        check_parity("u2netp", f"d{i}[{name}]", nhwc_to_nchw(out), r[f"d{i}"])


def test_zip_and_legacy_give_identical_params(loaded):
    a, b = (flatten_dict(loaded[n][1]) for n in sorted(CHECKPOINTS))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


def test_odd_sizes_ceil_pooling_and_upsampling(params):
    """70 x 45: the poolings see odd sides (70-35-18-9-5-3, 45-23-12-6-3-2); outputs come back at input size.

    Run-only, so compiled with XLA's backend optimisations off (a third of the compile time)."""
    x = np.random.default_rng(0).uniform(size=(1, 70, 45, 3)).astype(np.float32)
    lowered = jax.jit(lambda p, x: U2Net(U2NETP).apply({"params": p}, x)).lower(params, x)
    try:
        compiled = lowered.compile({"xla_backend_optimization_level": 0})
    except (RuntimeError, ValueError, TypeError):  # an XLA without that option: the default build
        compiled = lowered.compile()
    for out in compiled(params, x):
        out = np.asarray(out)
        assert out.shape == (1, 70, 45, 1)
        assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))


def test_max_pool_ceil_mode():
    x = np.arange(2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3) * np.array([1, -1, 0.5], np.float32)
    y = np.asarray(max_pool_ceil(jnp.asarray(x)))
    assert y.shape == (2, 3, 4, 3)
    for i in range(3):
        for j in range(4):
            np.testing.assert_array_equal(y[:, i, j], x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2)))


# ------------------------------------------------------------------ full-size schema


def test_full_u2net_schema_maps_completely(ref_dir, loaded):
    schema = json.loads((ref_dir / "u2net_schema.json").read_text())
    shapes = {k: tuple(v) for k, v in schema["state_dict"].items()}
    fake = {k: types.SimpleNamespace(shape=s) for k, s in shapes.items()}
    assert detect_variant(shapes) == "u2net" and detect_variant(fake) == "u2net"
    assert detect_config(fake) == U2NetConfig("u2net", 3, 1)
    assert detect_variant(loaded["tiny_u2netp.pth"][0]) == "u2netp"

    abstract = abstract_params(U2NetConfig("u2net"))
    plan, report = plan_conversion(fake, {"u2net": abstract})
    assert report.ok, report.format("u2net_schema.json")
    assert set(plan) == set(flatten_dict({"u2net": abstract}))  # every leaf of ours is filled

    ours = count_params(abstract)
    weights = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))
    stats = sum(math.prod(s) for k, s in shapes.items() if k.endswith(("running_mean", "running_var")))
    assert ours == weights
    assert ours - stats == schema["num_parameters"] == 44_009_869


def test_logical_axes_and_variant_errors():
    boxed = flatten_dict(abstract_params(U2NETP, boxed=True))
    bn = ("stage1", "rebnconvin", "bn_s1")
    assert all(boxed[bn + (leaf,)].names == ("norm",) for leaf in ("scale", "bias", "mean", "var"))
    assert boxed[("stage1", "rebnconv1", "conv_s1", "kernel")].names == ("conv_h", "conv_w", "conv_in", "conv_out")
    assert boxed[("side1", "kernel")].names == ("conv_h", "conv_w", "conv_in", "conv_out")
    with pytest.raises(ValueError, match="variant"):
        U2NetConfig("u2netx")
    with pytest.raises(ValueError, match="stage1.rebnconv1"):
        detect_variant({"outconv.weight": (1, 6, 1, 1)})
    with pytest.raises(ValueError, match="unknown"):
        detect_variant({"stage1.rebnconv1.conv_s1.weight": (8, 64, 3, 3)})


# ------------------------------------------------------------------ GetSODMask procedure


def _image(h: int, w: int) -> np.ndarray:
    """A (1, h, w, 3) smooth image in [0, 1] with a bright disc (batch 1 keeps the 320 x 320 runs short)."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    disc = ((yy - 0.4) ** 2 + (xx - 0.55) ** 2 < 0.08).astype(np.float64)
    return np.clip(np.stack([0.3 + 0.7 * disc * xx, yy, 0.2 + 0.8 * disc], -1)[None], 0, 1).astype(np.float32)


def _separable(mh: np.ndarray, x: np.ndarray, mw: np.ndarray) -> np.ndarray:
    """y[b, o, p, c] = sum_hw mh[o, h] x[b, h, w, c] mw[p, w], in float64."""
    y = np.einsum("oh,bhwc->bowc", mh.astype(np.float64), x.astype(np.float64))
    return np.einsum("pw,bowc->bopc", mw.astype(np.float64), y)


def _np_resize(x: np.ndarray, size) -> np.ndarray:
    return _separable(bilinear_matrix(x.shape[1], size[0]), x, bilinear_matrix(x.shape[2], size[1]))


@pytest.fixture(scope="module")
def sod(params):
    """Images 100 x 77, the soft map (threshold None: d0 at 320 x 320) of the pipeline on them, and a
    threshold that splits d0 roughly in half (random tiny weights put d0 mostly below the official 0.5)."""
    images = _image(100, 77)
    d0 = np.asarray(SaliencyMasker(U2NETP, params, size=(320, 320), threshold=None)(images))
    return images, d0, float(np.median(d0))


def test_mask_pipeline_matches_numpy(sod, params):
    images, d0, thr = sod
    # step 1: bilinear (align_corners=False, no antialias) to 320 x 320
    x320 = _np_resize(images, (320, 320))
    np.testing.assert_allclose(saliency._to_net_input(jnp.asarray(images)), x320, rtol=0, atol=2e-6)
    # step 2 (the network) is covered by test_u2netp_parity; d0 is the pipeline's soft map
    assert d0.shape == (1, 320, 320, 1) and d0.dtype == np.float32
    # step 3: clamp + threshold -> exactly {0, 1} when the target is the network size
    expected = (np.clip(d0, 0, 1) > np.float32(thr)).astype(np.float32)
    mask320 = np.asarray(SaliencyMasker(U2NETP, params, size=320, threshold=thr)(images))
    assert mask320.dtype == np.float32 and mask320.shape == (1, 320, 320, 1)
    assert set(np.unique(mask320)) == {0.0, 1.0}
    ambiguous = np.abs(d0 - thr) < 1e-5  # pixels a rounding difference could flip
    np.testing.assert_array_equal(mask320[~ambiguous], expected[~ambiguous])
    # step 4: bilinear upsampling 320 -> 512 (antialias irrelevant when upsampling)
    mask512 = np.asarray(saliency_mask(params, images, config=U2NETP, size=512, threshold=thr))
    assert mask512.shape == (1, 512, 512, 1) and mask512.dtype == np.float32
    np.testing.assert_allclose(mask512, _np_resize(mask320, (512, 512)), rtol=0, atol=1e-6)
    assert mask512.min() >= 0 and mask512.max() <= 1
    # fractional values only where the 2x2 source neighbourhood holds both 0 and 1 (object edges)
    taps = bilinear_matrix(320, 512) > 0
    any_fg = _separable(taps, mask320, taps) > 0
    any_bg = _separable(taps, 1.0 - mask320, taps) > 0
    fractional = (mask512 > 0) & (mask512 < 1)
    assert fractional.any() and np.all(any_fg[fractional] & any_bg[fractional])
    np.testing.assert_array_equal(mask512[~any_bg], 1.0)
    np.testing.assert_array_equal(mask512[~any_fg], 0.0)


def test_mask_downsampling_antialias(sod):
    """Targets below 320: antialias=False = torchvision 0.12 (official env) = plain bilinear;
    antialias=True = torchvision >= 0.17 = torch's aa bilinear, checked against PIL's BILINEAR resample."""
    _, d0, thr = sod
    mask = (np.clip(d0, 0, 1) > thr).astype(np.float32)
    size = (77, 100)
    plain = np.asarray(resize_mask(jnp.asarray(mask), size, antialias=False))
    np.testing.assert_allclose(plain, _np_resize(mask, size), rtol=0, atol=1e-6)
    aa = np.asarray(resize_mask(jnp.asarray(mask), size, antialias=True))
    for b in range(mask.shape[0]):
        pil = Image.fromarray(mask[b, :, :, 0]).resize(size[::-1], Image.Resampling.BILINEAR)
        np.testing.assert_allclose(aa[b, :, :, 0], np.asarray(pil), rtol=0, atol=1e-5)
    assert np.abs(aa - plain).max() > 0.05  # the two really differ when downsampling
    # upsampling: the aa weights equal the plain bilinear ones
    for n_in, n_out in ((320, 512), (7, 19)):
        np.testing.assert_allclose(bilinear_aa_matrix(n_in, n_out), bilinear_matrix(n_in, n_out), rtol=0, atol=1e-6)
    np.testing.assert_allclose(bilinear_aa_matrix(320, 77).sum(1), 1.0, atol=1e-6)
    # 2x downscale: PIL's [1/8, 3/8, 3/8, 1/8] triangle
    np.testing.assert_allclose(bilinear_aa_matrix(8, 4)[1, 1:5], [0.125, 0.375, 0.375, 0.125], atol=1e-7)


def test_width_only_check_and_bad_inputs(params, ref_dir):
    # the official resizes only when the WIDTH differs from 320
    assert saliency._to_net_input(jnp.zeros((1, 200, 320, 3))).shape == (1, 200, 320, 3)
    assert saliency._to_net_input(jnp.zeros((1, 320, 200, 3))).shape == (1, 320, 320, 3)
    masker = SaliencyMasker(U2NETP, params)
    good = np.full((1, 8, 8, 3), 0.5, np.float32)
    bad = {
        "NHWC": np.zeros((8, 8), np.float32),
        "3 channels": np.zeros((1, 8, 8, 4), np.float32),
        "floating point": np.zeros((1, 8, 8, 3), np.uint8),
        "in \\[0, 1\\]": good - 0.75,
    }
    for message, images in bad.items():
        with pytest.raises(ValueError, match=message):
            masker(images)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        masker(nan)
    with pytest.raises(ValueError, match="size"):
        SaliencyMasker(U2NETP, params, size=(512,))
    loaded = SaliencyMasker.from_checkpoint(ref_dir / "tiny_u2netp_legacy.pth", size=320, threshold=0.4)
    assert (loaded.config, loaded.size, loaded.threshold) == (U2NETP, (320, 320), 0.4)
