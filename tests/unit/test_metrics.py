"""Metric functions against closed forms and brute-force reference computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import daybreak.metrics
from daybreak.errors import UserError
from daybreak.metrics import _mean_rbf
from daybreak.metrics import clip_score, feature_stats, frechet_distance, frechet_from_stats, mmd


def _rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def test_public_module_exposes_the_functions():
    assert daybreak.metrics.frechet_distance is frechet_distance
    assert daybreak.metrics.mmd is mmd


def test_frechet_from_stats_diagonal_by_hand():
    # mean term (0-1)² + (0-2)² = 5; trace term 1+4+4+1 - 2·(√(1·4) + √(4·1)) = 2
    value = frechet_from_stats(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 1.0]))
    assert value == pytest.approx(7.0, abs=1e-9)


def test_frechet_from_stats_rotated_covariances():
    # Σ1 = R diag(a, b) Rᵀ, Σ2 = R diag(c, d) Rᵀ commute: tr((Σ1Σ2)^½) = √(ac) + √(bd)
    r = _rotation(0.7)
    s1, s2 = r @ np.diag([2.0, 0.5]) @ r.T, r @ np.diag([8.0, 3.0]) @ r.T
    expected = 0.25 + 2 + 0.5 + 8 + 3 - 2 * (math.sqrt(16.0) + math.sqrt(1.5))
    assert frechet_from_stats(np.array([0.5, 0.0]), s1, np.zeros(2), s2) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_on_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100_000, 2)) * np.array([1.0, 2.0])
    b = rng.normal(size=(100_000, 2)) * np.array([2.0, 1.0]) + np.array([1.0, 2.0])
    assert frechet_distance(a, b) == pytest.approx(7.0, abs=0.1)


def test_frechet_distance_matches_independent_symmetric_formula():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    root1 = scipy.linalg.sqrtm(s1).real
    cross = np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_identical_sets_and_input_types():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 5))
    assert abs(frechet_distance(a, a)) < 1e-6
    b = rng.normal(size=(30, 5)) + 1
    expected = frechet_distance(a, b)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)
    assert isinstance(frechet_distance(a, b), float)


def test_frechet_distance_fewer_samples_than_dims_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(6, 16)) + 0.5
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0


def test_feature_stats_uses_n_minus_one_and_needs_two_samples():
    a = np.array([[0.0, 1.0], [2.0, 5.0]])
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu, [1.0, 3.0])
    np.testing.assert_allclose(sigma, [[2.0, 4.0], [4.0, 8.0]])
    with pytest.raises(UserError):
        feature_stats(a[:1])


def _brute_mmd(x: np.ndarray, y: np.ndarray, sigma: float, scale: float) -> float:
    def mean_k(p, q):
        total = 0.0
        for u in p:
            for v in q:
                total += math.exp(-sum((ui - vi) ** 2 for ui, vi in zip(u, v)) / (2 * sigma**2))
        return total / (len(p) * len(q))

    return scale * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def test_mmd_matches_double_loop_with_default_and_custom_sigma_scale():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)) * 5, rng.normal(size=(5, 3)) * 5 + 2
    assert mmd(x, y) == pytest.approx(_brute_mmd(x, y, 10.0, 1000.0), rel=1e-9)
    assert mmd(x, y, sigma=3.0, scale=1.0) == pytest.approx(_brute_mmd(x, y, 3.0, 1.0), rel=1e-9)
    unscaled = mmd(x, y, sigma=3.0, scale=1.0)
    assert mmd(x, y, sigma=3.0, scale=50.0) == pytest.approx(50.0 * unscaled, rel=1e-12)


def test_mmd_identical_sets_is_zero_and_torch_equals_numpy():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(15, 4)) + 1
    assert abs(mmd(x, x)) < 1e-9
    assert mmd(torch.from_numpy(x), torch.from_numpy(y)) == mmd(x, y)
    assert mmd(x, y) > 0


def test_mean_rbf_blocks_do_not_change_the_result():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(8, 3))
    assert _mean_rbf(x, y, 0.1, block=3) == pytest.approx(_mean_rbf(x, y, 0.1), rel=1e-12)


def test_clip_score_by_hand():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0], [1.0, 0.0]])
    texts = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    # cosines 1, 0, 1/√2, -1 (clipped to 0)
    expected = 100 * (1 + 0 + 1 / math.sqrt(2) + 0) / 4
    assert clip_score(images, texts) == pytest.approx(expected, rel=1e-12)
    from_torch = clip_score(torch.from_numpy(images).float(), torch.from_numpy(texts))
    assert from_torch == pytest.approx(expected, rel=1e-6)
