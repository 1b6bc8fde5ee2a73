"""torch-semantics resize matrices: known F.interpolate values (bilinear / bicubic, both align_corners)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.annotators.saliency import resize_bilinear_aa
from cnc_jax.models.resize import bicubic_matrix, bilinear_matrix, resize_bicubic, resize_bilinear


def test_bilinear_matches_torch_values():
    ramp = np.array([0.0, 1.0], np.float32)
    # F.interpolate(tensor([[[0., 1.]]]), size=4, mode='linear') -> [0, .25, .75, 1]
    np.testing.assert_allclose(bilinear_matrix(2, 4) @ ramp, [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(bilinear_matrix(2, 3, align_corners=True) @ ramp, [0.0, 0.5, 1.0])
    # downsampling 4 -> 2 (no antialias) reads the two middle-ish pixels: sources 0.5 and 2.5
    np.testing.assert_allclose(bilinear_matrix(4, 2) @ np.arange(4, dtype=np.float32), [0.5, 2.5])
    np.testing.assert_allclose(bilinear_matrix(5, 5), np.eye(5), atol=0)


def test_bicubic_rows_sum_to_one_and_identity():
    for n_in, n_out in ((64, 16), (16, 64), (7, 3), (3, 7)):
        np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(bicubic_matrix(6, 6), np.eye(6), atol=0)


def test_resize_bilinear_nhwc_is_separable():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    y = np.asarray(resize_bilinear(x, (9, 4)))
    expected = np.einsum("oh,bhwc,pw->bopc", bilinear_matrix(5, 9), x, bilinear_matrix(7, 4))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def _align_corners_linear(x, size):
    """jax.image.scale_and_translate mapping output corners onto input corners (torch's align_corners=True)."""
    scale = jnp.array([(size[0] - 1) / (x.shape[1] - 1), (size[1] - 1) / (x.shape[2] - 1)])
    return jax.image.scale_and_translate(x, (x.shape[0], *size, x.shape[3]), (1, 2), scale, 0.5 - 0.5 * scale,
                                         "linear", antialias=False)


@pytest.mark.parametrize("ours, library, in_hw, out_hw", [
    (resize_bilinear, lambda x, s: jax.image.resize(x, (1, *s, 1), "linear", antialias=False), (512, 512), (299, 299)),
    (resize_bilinear, lambda x, s: jax.image.resize(x, (1, *s, 1), "linear", antialias=False), (37, 53), (320, 320)),
    (resize_bilinear_aa, lambda x, s: jax.image.resize(x, (1, *s, 1), "linear", antialias=True), (512, 512),
     (299, 299)),
    (lambda x, s: resize_bicubic(x[..., 0], s)[..., None],
     lambda x, s: jax.image.resize(x, (1, *s, 1), "cubic-pytorch", antialias=False), (320, 320), (77, 77)),
    (lambda x, s: resize_bilinear(x, s, align_corners=True), _align_corners_linear, (64, 64), (512, 512)),
])
def test_jax_image_resize_differs_from_torch_by_more_than_1e6(ours, library, in_hw, out_hw):
    """Why the matrices stay: at sizes the models use, jax.image differs from torch's float32 positions."""
    x = np.random.default_rng(0).random((1, *in_hw, 1)).astype(np.float32)
    expected, got = np.asarray(ours(jnp.asarray(x), out_hw)), np.asarray(library(jnp.asarray(x), out_hw))
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-6 < relative < 1e-3, relative
