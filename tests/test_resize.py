"""torch-semantics resize matrices: known F.interpolate values (bilinear / bicubic, both align_corners)."""

import numpy as np

from cnc_jax.models.resize import bicubic_matrix, bilinear_matrix, resize_bilinear


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
