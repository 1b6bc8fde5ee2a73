"""The paper's metrics as the reference packages compute them (no file I/O, no networks here).

  FID        pytorch-fid: running mean / covariance of pool3 features (float64, host), Fréchet distance
             with scipy's sqrtm, its eps fallback for a singular product and its imaginary-component check
  IS         torch-fidelity: softmax over all logits, `splits` consecutive chunks, exp(mean KL(p(y|x) || p(y)))
             per chunk, mean and population std
  CLIPScore  torchmetrics: 100 * cos(image, text) per pair, max(mean, 0)
  SSIM       torchmetrics' structural_similarity_index_measure (gaussian window, data range 1), per image
  depth      mean absolute error between a depth map of the generated image and the condition, fg / bg by mask
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


class FeatureStats:
    """Streaming mean and covariance (np.cov(rowvar=False), ddof 1) of feature rows, in float64.

    Batches are merged with Chan et al.'s pairwise update, so the result does not depend on how the rows
    were batched beyond rounding.
    """

    def __init__(self, dim: Optional[int] = None):
        self.n, self.dim = 0, dim
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None

    def update(self, features) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or (self.dim is not None and x.shape[1] != self.dim):
            raise ValueError(f"features of shape {x.shape}, expected (n, {self.dim})")
        if not len(x):
            return
        self.dim = x.shape[1]
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self.n == 0:
            self.n, self._mean, self._m2 = len(x), mean_b, m2_b
            return
        n_a, n_b = self.n, len(x)
        total = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / total)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / total)
        self.n = total

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features were added")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self._m2 / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch_fid.fid_score.calculate_frechet_distance: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of torch-fidelity's Inception Score over (N, classes) logits, in float64, chunks in order."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images (one per split), got {n}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(axis=0, keepdims=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def clip_pair_scores(image_embeds, text_embeds):
    """100 * cosine similarity per (image, caption) pair (B,)."""
    a = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    b = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100.0 * jnp.sum(a * b, axis=-1)


def clip_score(pair_scores) -> float:
    """torchmetrics CLIPScore.compute: max(mean of the per-pair scores, 0)."""
    return max(float(np.mean(np.asarray(pair_scores, np.float64))), 0.0)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """torchmetrics' normalised 1-D gaussian (float32)."""
    dist = np.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=np.float32)
    gauss = np.exp(-np.square(dist / np.float32(sigma)) / 2)
    return (gauss / gauss.sum()).astype(np.float32)


def ssim(a, b, *, sigma: float = 1.5, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03):
    """torchmetrics' SSIM per image (B,) of NHWC float images.

    Border handling is torchmetrics' (>= 1.x): both images are reflect-padded by the window radius (F.pad
    'reflect', edge not repeated) and the SSIM map of the same size as the image is averaged, border windows
    included (scikit-image instead drops the border; its numbers are higher). The window side is
    int(3.5 * sigma + 0.5) * 2 + 1 (11 for sigma 1.5); variances are clamped at 0. The moments are taken of
    x - data_range / 2 (variances do not change; the means are shifted back): less float32 cancellation in
    E[x^2] - E[x]^2, which lands on the float64 value (torchmetrics' own float32 rounding is ~4e-6 of it).
    """
    size = int(3.5 * sigma + 0.5) * 2 + 1
    g = jnp.asarray(gaussian_window(size, sigma))
    kernel = jnp.outer(g, g)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    channels = a.shape[-1]
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"SSIM needs two NHWC batches of one shape, got {a.shape} and {b.shape}")
    pad = (size - 1) // 2
    if min(a.shape[1:3]) <= pad:
        raise ValueError(f"SSIM's reflect padding by {pad} needs images larger than {pad}x{pad}, got {a.shape[1:3]}")
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    shift = data_range / 2
    a, b = jnp.pad(a, widths, mode="reflect") - shift, jnp.pad(b, widths, mode="reflect") - shift
    stacked = jnp.concatenate([a, b, a * a, b * b, a * b], axis=0)
    weights = jnp.broadcast_to(kernel[:, :, None, None], (size, size, 1, channels))
    filtered = jax.lax.conv_general_dilated(stacked, weights, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
    mu_a, mu_b, e_aa, e_bb, e_ab = jnp.split(filtered, 5, axis=0)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    var_a, var_b = jnp.maximum(e_aa - mu_a * mu_a, 0.0), jnp.maximum(e_bb - mu_b * mu_b, 0.0)
    cov = e_ab - mu_a * mu_b
    mu_a, mu_b = mu_a + shift, mu_b + shift
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    index = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return jnp.mean(index, axis=(1, 2, 3))


def depth_errors(depth, fg_depth=None, bg_depth=None, mask=None):
    """Per-image absolute-error sums and pixel counts of a (B, H, W) depth map against the conditions.

    The condition is mask * fg + (1 - mask) * bg (a hard mask, > 0.5); with one map only, that map.
    Returns {'all': (sum, count), 'fg': ..., 'bg': ...} of (B,) arrays; 'fg' / 'bg' only with a mask and
    both maps. Sums, not means, so the caller can pool pixels over a whole set.
    """
    if fg_depth is None and bg_depth is None:
        raise ValueError("depth error needs a foreground or a background depth condition")
    depth = jnp.asarray(depth, jnp.float32)
    out = {}
    if fg_depth is not None and bg_depth is not None and mask is not None:
        fg = mask > 0.5
        err_fg, err_bg = jnp.abs(depth - fg_depth), jnp.abs(depth - bg_depth)
        out["fg"] = (jnp.sum(jnp.where(fg, err_fg, 0), axis=(1, 2)), jnp.sum(fg, axis=(1, 2)))
        out["bg"] = (jnp.sum(jnp.where(fg, 0, err_bg), axis=(1, 2)), jnp.sum(~fg, axis=(1, 2)))
        out["all"] = (out["fg"][0] + out["bg"][0], out["fg"][1] + out["bg"][1])
    else:
        cond = fg_depth if fg_depth is not None else bg_depth
        err = jnp.abs(depth - cond)
        out["all"] = (jnp.sum(err, axis=(1, 2)), jnp.full(depth.shape[:1], depth.shape[1] * depth.shape[2]))
    return out


__all__ = ["FeatureStats", "frechet_distance", "inception_score", "clip_pair_scores", "clip_score",
           "gaussian_window", "ssim", "depth_errors"]
