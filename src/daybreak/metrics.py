"""Image-quality metrics as plain functions on feature arrays.

Extracting features is slow and model-specific; comparing them is cheap and should not depend on
which model, dtype or device produced them. So every metric here takes two N×D arrays (numpy or
torch), converts them to float64 and returns a python float:

- `frechet_distance`: FID when the features are Inception-v3 pool3, "FD" on any other extractor;
  covariances with N − 1, as pytorch-fid.
- `mmd`: the CMMD estimator (Jayasumana et al. 2024, google-research/cmmd): biased MMD² with the
  diagonal terms included, Gaussian RBF kernel, times `scale`. CMMD on CLIP embeddings, DINO-MMD
  on DINOv2 embeddings.
- `clip_score`: mean of 100·max(cos, 0) between paired image and text embeddings.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from daybreak.errors import UserError

ArrayLike = np.ndarray | torch.Tensor


def _as_f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_features(x: ArrayLike) -> np.ndarray:
    a = _as_f64(x)
    if a.ndim != 2:
        raise ValueError(f"expected an N×D feature array, got shape {a.shape}")
    return a


def feature_stats(a: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D×D) of N×D features: what a Fréchet distance needs."""
    x = _as_features(a)
    if len(x) < 2:
        raise UserError(f"a Fréchet distance needs at least 2 images per set, got {len(x)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians.

    A singular product (fewer samples than dimensions) can make the square root non-finite; the
    covariances are then offset by eps·I. Round-off leaves tiny imaginary parts, which are dropped.
    """
    m1, m2 = np.atleast_1d(_as_f64(mu1)), np.atleast_1d(_as_f64(mu2))
    s1, s2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"mismatched statistics: {m1.shape}, {s1.shape} vs {m2.shape}, {s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt of the covariance product is complex: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Fréchet distance between the Gaussians fitted to two N×D feature sets."""
    return frechet_from_stats(*feature_stats(a), *feature_stats(b))


def _mean_rbf(x: np.ndarray, y: np.ndarray, gamma: float, block: int = 2048) -> float:
    """mean over all pairs of exp(−γ‖x_i − y_j‖²), in row blocks so N×N never sits in memory."""
    y_sq = (y * y).sum(axis=1)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start : start + block]
        d2 = (xb * xb).sum(axis=1)[:, None] + y_sq[None, :] - 2 * xb @ y.T
        total += float(np.exp(-gamma * np.maximum(d2, 0.0)).sum())
    return total / (len(x) * len(y))


def mmd(a: ArrayLike, b: ArrayLike, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """The CMMD estimator: scale · (mean K_aa + mean K_bb − 2 mean K_ab), K = exp(−‖x−y‖²/2σ²).

    Biased (the diagonal terms are included), as in the CMMD reference implementation.
    """
    x, y = _as_features(a), _as_features(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) == 0 or len(y) == 0:
        raise UserError("MMD needs at least one image per set")
    gamma = 1.0 / (2.0 * sigma**2)
    return scale * (_mean_rbf(x, x, gamma) + _mean_rbf(y, y, gamma) - 2 * _mean_rbf(x, y, gamma))


def clip_score(image_embeds: ArrayLike, text_embeds: ArrayLike) -> float:
    """CLIP score: mean over pairs (row i with row i) of 100 · max(cos(image, text), 0)."""
    x, y = _as_features(image_embeds), _as_features(text_embeds)
    if x.shape != y.shape:
        raise ValueError(f"need paired embeddings of equal shape, got {x.shape} and {y.shape}")
    cos = (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float((100.0 * np.maximum(cos, 0.0)).mean())
