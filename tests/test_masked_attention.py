"""Soft-guidance cross-attention against masked_attention.npz, and the mask resize on non-square maps."""

import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.models.attention import Attention, foreground_mask, soft_guidance_allowed
from cnc_jax.models.resize import bicubic_matrix, resize_bicubic
from tests.conftest import check_parity, nchw_to_nhwc


def _attention_params(r):
    dense = lambda w: {"kernel": np.asarray(w).T}
    return {"to_q": dense(r["to_q.weight"]), "to_k": dense(r["to_k.weight"]), "to_v": dense(r["to_v.weight"]),
            "to_out": {"kernel": r["to_out.0.weight"].T, "bias": r["to_out.0.bias"]}}


def _sizes(r, kind):
    return sorted(int(k.rsplit("_", 1)[1]) for k in r if k.startswith(f"mask_resized_{kind}_"))


def test_masked_cross_attention_output(ref):
    r = ref("masked_attention")
    heads, dim_head = int(r["heads"]), int(r["dim_head"])
    side = int(round(np.sqrt(r["x"].shape[1])))
    attn = Attention(heads, dim_head)
    params = {"params": _attention_params(r)}
    fg = foreground_mask(nchw_to_nhwc(r["mask"]), (side, side))
    allowed = soft_guidance_allowed(fg, r["context"].shape[1], num_global_tokens=4)
    assert np.array_equal(np.asarray(allowed), r["allowed"])
    out = attn.apply(params, r["x"], r["context"], allowed)
    check_parity("masked_attention", "out", out, r["out"])
    out_nomask = attn.apply(params, r["x"], r["context"])
    check_parity("masked_attention", "out_nomask", out_nomask, r["out_nomask"])


def test_mask_resize_float_and_bool(ref):
    r = ref("masked_attention")
    mask = nchw_to_nhwc(r["mask"])
    assert _sizes(r, "float") and _sizes(r, "bool")
    for s in _sizes(r, "float"):
        ours = resize_bicubic(mask[..., 0], (s, s))[:, None]
        check_parity("masked_attention", f"mask_resized_float_{s}", ours, r[f"mask_resized_float_{s}"], tol=1e-5)
    for s in _sizes(r, "bool"):
        ours = np.asarray(foreground_mask(mask, (s, s))).reshape(-1, 1, s, s)
        assert np.array_equal(ours, r[f"mask_resized_bool_{s}"]), f"bool mask differs at {s}x{s}"


@pytest.mark.parametrize("image_hw,map_hw", [((128, 64), (16, 8)), ((64, 192), (8, 24)), ((96, 160), (12, 20)),
                                             ((40, 24), (5, 3))])
def test_foreground_mask_non_square_follows_each_axis(image_hw, map_hw):
    """Non-square maps: each axis is resized separately to the map's own side (not sqrt(N))."""
    rng = np.random.default_rng(0)
    mask = (rng.random((2,) + image_hw + (1,)) > 0.8).astype(np.float32)
    mask[0, : image_hw[0] // 2] = 0.0
    fg = np.asarray(foreground_mask(mask, map_hw)).reshape((2,) + map_hw)
    dense = np.asarray(resize_bicubic(jnp.asarray(mask[..., 0]), map_hw)) != 0
    assert np.array_equal(fg, dense)
    # a row-constant mask resizes like its 1-D profile along H alone
    profile = (rng.random(image_hw[0]) > 0.7).astype(np.float32)
    rows = np.broadcast_to(profile[None, :, None, None], (1,) + image_hw + (1,))
    fg_rows = np.asarray(foreground_mask(rows, map_hw)).reshape(map_hw)
    expected = (bicubic_matrix(image_hw[0], map_hw[0]) != 0).astype(np.float32) @ profile > 0
    assert np.array_equal(fg_rows, np.broadcast_to(expected[:, None], map_hw))


def test_bicubic_matrix_is_torch_cubic():
    """Rows sum to one; an integer factor reads the 4 taps around the centre with Keys a=-0.75 weights."""
    m = bicubic_matrix(64, 16)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=0, atol=1e-6)
    row = m[5]  # source centre 4 * 5.5 - 0.5 = 21.5 -> taps 20..23 at t = 0.5
    assert list(np.nonzero(row)[0]) == [20, 21, 22, 23]
    np.testing.assert_allclose(row[np.nonzero(row)], [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-7)
