"""FID / IS / SSIM / depth-error formulas vs pytorch-fid, torch-fidelity and torchmetrics (CNC_REFERENCE_DIR/eval/)."""

import numpy as np
import pytest

from cnc_jax.eval import metrics
from tests.conftest import check_parity, nchw_to_nhwc


@pytest.fixture(scope="module")
def eval_ref(ref):
    return ref("eval/eval_ref")


def _stats(features, batch):
    stats = metrics.FeatureStats()
    for start in range(0, len(features), batch):
        stats.update(features[start:start + batch])
    return stats


def test_streamed_statistics_equal_np_cov(eval_ref):
    features = eval_ref["fid_features_a"].astype(np.float64)
    stats = _stats(features, 7)
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=0, atol=1e-12)
    assert stats.n == len(features)


def test_frechet_distance(eval_ref):
    a, b = _stats(eval_ref["fid_features_a"], 64), _stats(eval_ref["fid_features_b"], 101)
    value = metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov)
    check_parity("eval formulas", "frechet_distance", value, eval_ref["fid_value"], tol=1e-5)
    assert abs(metrics.frechet_distance(a.mean, a.cov, a.mean, a.cov)) < 1e-6


def test_frechet_distance_eps_fallback_for_a_singular_product(eval_ref, monkeypatch):
    """pytorch-fid's fallback: a non-finite sqrtm is retried with eps on both diagonals."""
    a, b = _stats(eval_ref["fid_features_a"], 300), _stats(eval_ref["fid_features_b"], 300)
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky)
    with pytest.warns(UserWarning, match="singular product"):
        value = metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=1e-6)
    offset = np.eye(len(a.mean)) * 1e-6
    np.testing.assert_allclose(calls[1], (a.cov + offset) @ (b.cov + offset), rtol=1e-12)
    diff = a.mean - b.mean
    direct = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(real_sqrtm(calls[1]).real)
    assert value == pytest.approx(direct, rel=1e-12)


def test_frechet_distance_rejects_a_large_imaginary_component(monkeypatch):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: m + 1j * np.eye(len(m)))
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_inception_score(eval_ref):
    mean, std = metrics.inception_score(eval_ref["is_logits_50"], splits=10)
    check_parity("eval formulas", "is_mean", mean, eval_ref["is_mean"], tol=1e-5)
    check_parity("eval formulas", "is_std", std, eval_ref["is_std"], tol=1e-5)
    with pytest.raises(ValueError, match="at least 10"):
        metrics.inception_score(eval_ref["is_logits_50"][:9], splits=10)


def test_ssim_torchmetrics(eval_ref):
    value = metrics.ssim(nchw_to_nhwc(eval_ref["ssim_a"]), nchw_to_nhwc(eval_ref["ssim_b"]))
    check_parity("eval formulas", "ssim_torchmetrics", value, eval_ref["ssim_torchmetrics"], tol=1e-5)
    same = metrics.ssim(nchw_to_nhwc(eval_ref["ssim_a"]), nchw_to_nhwc(eval_ref["ssim_a"]))
    np.testing.assert_allclose(same, 1.0, atol=1e-5)


def test_depth_errors_split_by_mask():
    rng = np.random.default_rng(0)
    depth, fg, bg = (rng.uniform(size=(2, 8, 8)).astype(np.float32) for _ in range(3))
    mask = np.zeros((2, 8, 8), np.float32)
    mask[:, :3] = 1
    out = metrics.depth_errors(depth, fg, bg, mask)
    inside = mask > 0.5
    np.testing.assert_allclose(out["fg"][0], np.where(inside, np.abs(depth - fg), 0).sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out["bg"][0], np.where(inside, 0, np.abs(depth - bg)).sum(axis=(1, 2)), rtol=1e-6)
    assert list(np.asarray(out["fg"][1])) == [24, 24] and list(np.asarray(out["all"][1])) == [64, 64]
    only_bg = metrics.depth_errors(depth, None, bg, None)
    np.testing.assert_allclose(only_bg["all"][0], np.abs(depth - bg).sum(axis=(1, 2)), rtol=1e-6)
    assert set(only_bg) == {"all"}
