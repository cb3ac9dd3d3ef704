"""Frechet Audio Distance: scipy's formula, singular covariances, FAD-inf, the statistics cache, the evaluate module."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

import hf_audio_trainer.metrics
from hf_audio_trainer.metrics import fad as fad_module
from hf_audio_trainer.metrics.fad import (
    embedding_statistics,
    fad,
    fad_inf,
    frechet_distance,
    reference_statistics,
)

os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")


def _scipy_frechet(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The textbook formula with scipy's sqrtm (pytorch-fid, fadtk), without their clean-ups."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
    diff = mu_a - mu_b
    return diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean).real


def _random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a well-conditioned covariance with correlated dimensions and varied scales."""
    factor = rng.standard_normal((dim, dim)) * rng.uniform(0.1, 2.0, dim)
    return rng.standard_normal(dim), factor @ factor.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_frechet_distance_matches_scipy_formula(dim):
    rng = np.random.default_rng(dim)
    for _ in range(5):
        mu_a, sigma_a = _random_gaussian(rng, dim)
        mu_b, sigma_b = _random_gaussian(rng, dim)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # well-conditioned input: the sqrtm cross-check must stay quiet
            ours = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        assert isinstance(ours, float)
        assert ours == pytest.approx(_scipy_frechet(mu_a, sigma_a, mu_b, sigma_b), rel=1e-6)


def test_frechet_distance_of_hand_computed_cases():
    # For commuting covariances FD = ||mu_a - mu_b||^2 + sum over eigen-directions of (std_a - std_b)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(2.0**2 + (2.0 - 3.0) ** 2)
    diagonal = frechet_distance([1.0, 0.0], np.diag([1.0, 1.0]), [0.0, 0.0], np.diag([4.0, 4.0]))
    assert diagonal == pytest.approx(1.0 + 2 * (1.0 - 2.0) ** 2)


def test_identical_statistics_give_zero_even_when_scipy_goes_negative():
    rng = np.random.default_rng(0)
    mu, sigma = _random_gaussian(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-8
    scipy_negative = 0
    for _ in range(20):
        x = rng.standard_normal((5, 64))  # rank-4 covariance in 64 dimensions
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        ours = frechet_distance(mu, sigma, mu, sigma)
        assert isinstance(ours, float) and 0.0 <= ours <= 1e-8
        scipy_negative += _scipy_frechet(mu, sigma, mu, sigma) < 0
    assert scipy_negative > 0  # the case this guards against does occur with the textbook formula


def test_never_negative_or_complex_on_random_draws_including_singular_covariances():
    rng = np.random.default_rng(1)
    for trial in range(60):
        dim = int(rng.choice([4, 16, 64]))
        n = int(rng.choice([2, 5, dim, 4 * dim]))
        xa = rng.standard_normal((n, dim)) * rng.uniform(1e-3, 10)
        xb = xa + 1e-6 * rng.standard_normal((n, dim)) if trial % 3 == 0 else rng.standard_normal((n, dim))
        stats_a = xa.mean(0), np.cov(xa, rowvar=False).reshape(dim, dim)
        stats_b = xb.mean(0), np.cov(xb, rowvar=False).reshape(dim, dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = frechet_distance(*stats_a, *stats_b)
        assert isinstance(value, float) and np.isfinite(value) and value >= 0.0


def test_cross_check_warns_when_scipy_disagrees(monkeypatch):
    rng = np.random.default_rng(2)
    mu_a, sigma_a = _random_gaussian(rng, 8)
    mu_b, sigma_b = _random_gaussian(rng, 8)
    expected = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    monkeypatch.setattr(linalg, "sqrtm", lambda a: 1.01 * np.eye(len(a)) * np.trace(a))
    with pytest.warns(UserWarning, match="sqrtm gives"):
        assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == expected  # the eigendecomposition value is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b, cross_check=False) == expected


def test_singular_covariance_warns_with_the_sample_count_and_adds_a_ridge():
    x = np.random.default_rng(3).standard_normal((5, 64))
    with pytest.warns(UserWarning, match=r"singular with 5 samples in 64 dimensions.*regularised"):
        mu, sigma = embedding_statistics(x)
    plain = np.cov(x, rowvar=False)
    ridge = sigma - plain
    expected = fad_module.SINGULAR_RIDGE * np.trace(plain) / 64
    np.testing.assert_allclose(np.diag(ridge), expected, rtol=1e-9)
    np.testing.assert_allclose(ridge - np.diag(np.diag(ridge)), 0.0, atol=1e-15)
    np.testing.assert_allclose(mu, x.mean(0))
    with pytest.warns(UserWarning, match="5 samples in 64"):
        fad(x, x + 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, sigma = embedding_statistics(x[:, :4])  # 5 samples in 4 dimensions: regular, no ridge
    np.testing.assert_allclose(sigma, np.cov(x[:, :4], rowvar=False), rtol=1e-12)


def test_fad_of_same_gaussian_is_small_and_grows_with_the_mean_shift():
    rng = np.random.default_rng(4)
    dim, n = 8, 20000
    _, sigma = _random_gaussian(rng, dim)
    chol = np.linalg.cholesky(sigma)
    a = rng.standard_normal((n, dim)) @ chol.T
    b = rng.standard_normal((n, dim)) @ chol.T
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    # Same covariance, means delta apart: the population FAD is ||delta||^2; the sample one adds ~1e-3 of bias.
    baseline = fad(a, b)
    assert baseline < 0.01
    for shift in (0.5, 1.0, 2.0):
        assert fad(a, b + shift * direction) == pytest.approx(shift**2, abs=0.03 + 0.05 * shift)
    assert fad(a, b + 0.5 * direction) < fad(a, b + 1.0 * direction) < fad(a, b + 2.0 * direction)


def test_fad_takes_torch_tensors_and_validates_shapes():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4)) + 0.5
    expected = fad(a, b)
    assert fad(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)
    assert fad(torch.from_numpy(a).bfloat16(), torch.from_numpy(b).float()) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="dimension 4 but embeddings_b has 3"):
        fad(a, b[:, :3])
    with pytest.raises(ValueError, match=r"shape \[n_samples, dim\], got shape \[50\]"):
        fad(a[:, 0], b)
    with pytest.raises(ValueError, match="at least 2 embeddings, got 1"):
        fad(a[:1], b)
    with pytest.raises(ValueError, match="NaN"):
        fad(np.where(a > 2, np.nan, a), b)
    mu, sigma = embedding_statistics(a)
    with pytest.raises(ValueError, match=r"sigma_b must have shape \[4, 4\]"):
        frechet_distance(mu, sigma, mu, sigma[:3, :3])
    with pytest.raises(ValueError, match="different dimensions: 4 and 3"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, sigma, mu, sigma + np.triu(np.ones((4, 4)), 1))


def test_fad_inf_is_closer_to_the_population_distance_than_fad_at_small_n():
    # 48-D Gaussians with equal covariance and means 1 apart: the population FAD is exactly 1. With 1000 samples
    # plain FAD is biased upwards by ~0.7; FAD-inf removes the 1/n part of that bias.
    rng = np.random.default_rng(6)
    dim = 48
    delta = np.zeros(dim)
    delta[0] = 1.0
    reference = rng.standard_normal((10000, dim))
    generated = rng.standard_normal((1000, dim)) + delta
    plain = fad(reference, generated)
    result = fad_inf(reference, generated, min_n=200, seed=0)
    assert plain - 1.0 > 0.4
    assert abs(result.score - 1.0) < 0.5 * abs(plain - 1.0)
    assert result.slope > 0  # smaller sets look worse
    assert 0.5 < result.r2 <= 1.0
    sizes = [n for n, _ in result.points]
    assert len(sizes) == 15 and sizes[0] == 200 and sizes[-1] == 1000
    assert result.points[-1][1] == pytest.approx(plain)  # the largest "subset" is the whole set
    assert fad_inf(reference, generated, min_n=200, seed=0) == result  # seeded


def test_fad_inf_defaults_and_errors():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((500, 4)), rng.standard_normal((300, 4))
    result = fad_inf(a, b, num_points=5)
    assert [n for n, _ in result.points] == [30, 98, 165, 232, 300]  # min_n = max(2 * dim, len(b) // 10)
    with pytest.raises(ValueError, match=r"min_n must lie in .* = \[2, 300\), got 300"):
        fad_inf(a, b, min_n=300)
    with pytest.raises(ValueError, match="num_points must be at least 2"):
        fad_inf(a, b, num_points=1)


def test_reference_statistics_are_computed_once_and_cached(tmp_path):
    rng = np.random.default_rng(8)
    embeddings = rng.standard_normal((40, 6))
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return embeddings

    key = "dataset=abc123|embedder=mel|sample_rate=16000"
    mu, sigma = reference_statistics(key, compute, tmp_path / "cache")
    again_mu, again_sigma = reference_statistics(key, compute, tmp_path / "cache")
    assert len(calls) == 1
    assert again_mu.dtype == np.float64 and np.array_equal(again_mu, mu) and np.array_equal(again_sigma, sigma)
    expected_mu, expected_sigma = embedding_statistics(embeddings)
    assert np.array_equal(mu, expected_mu) and np.array_equal(sigma, expected_sigma)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].startswith("fad_reference_") and files[0].endswith(".safetensors")

    from safetensors import safe_open

    with safe_open(tmp_path / "cache" / files[0], "np") as f:
        assert f.metadata() == {"key": key}
    reference_statistics(key + "|other", compute, tmp_path / "cache")
    assert len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 2


def test_reference_statistics_leave_no_file_when_compute_fails(tmp_path):
    def compute() -> np.ndarray:
        raise RuntimeError("embedder crashed")

    with pytest.raises(RuntimeError, match="embedder crashed"):
        reference_statistics("k", compute, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_module_loads_offline_and_matches_fad(tmp_path):
    import evaluate

    folder = Path(hf_audio_trainer.metrics.__file__).parent / "fad"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == ["fad.py"]
    assert fad_module.__file__.endswith(os.path.join("metrics", "fad.py"))  # the module file, not the folder
    metric = evaluate.load(str(folder.resolve()), cache_dir=str(tmp_path))
    rng = np.random.default_rng(9)
    predictions, references = rng.standard_normal((120, 5)) + 0.3, rng.standard_normal((120, 5))
    result = metric.compute(predictions=predictions, references=references)
    assert result == {"fad": pytest.approx(fad(predictions, references), rel=1e-12)}
    for start in range(0, 120, 40):
        metric.add_batch(predictions=predictions[start : start + 40], references=references[start : start + 40])
    assert metric.compute()["fad"] == pytest.approx(result["fad"], rel=1e-12)
