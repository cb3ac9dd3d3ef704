"""Frechet Audio Distance (FAD) between two sets of clip embeddings, FAD-inf, and cached reference statistics.

FAD (Kilgour et al., 2019) fits a Gaussian to each set of embeddings [n_samples, dim] and returns the Frechet
distance between the two: ||mu_a - mu_b||^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2)).
Everything is computed in float64. Embeddings come from `hf_audio_trainer.metrics.embedders`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

# `frechet_distance` warns when scipy's sqrtm and the eigendecomposition disagree by more than this, relatively.
SQRTM_CHECK_RTOL = 1e-3
# Ridge added to a singular covariance's diagonal, as a fraction of its mean variance (trace / dim).
SINGULAR_RIDGE = 1e-6


def _as_embeddings(embeddings: Any, name: str) -> np.ndarray:
    """Float64 [n_samples, dim] from a numpy array, a torch tensor (any device or dtype) or nested lists."""
    if hasattr(embeddings, "detach"):  # torch tensor: numpy reads neither bfloat16 nor GPU memory
        embeddings = embeddings.detach().cpu().double().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n_samples, dim], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def embedding_statistics(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [dim] and unbiased covariance [dim, dim] of embeddings [n_samples, dim] (numpy or torch), in float64.

    With n_samples <= dim the sample covariance is singular (rank at most n_samples - 1) and FAD is dominated by
    estimation noise, so this warns and adds SINGULAR_RIDGE (1e-6) x the mean variance to the diagonal. The ridge
    keeps the matrix square roots well conditioned and moves FAD by about that relative amount.
    """
    x = _as_embeddings(embeddings, "embeddings")
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"FAD statistics need at least 2 embeddings, got {n}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (n - 1)
    if n <= dim:
        warnings.warn(
            f"covariance is singular with {n} samples in {dim} dimensions; the result is regularised "
            f"(FAD needs more samples than dimensions to be meaningful)",
            stacklevel=2,
        )
        mean_variance = np.trace(sigma) / dim
        sigma[np.diag_indices(dim)] += SINGULAR_RIDGE * (mean_variance if mean_variance > 0 else 1.0)
    return mu, sigma


def _check_statistics(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu_{name} must have shape [dim], got shape {list(mu.shape)}")
    if sigma.shape != (len(mu), len(mu)):
        raise ValueError(
            f"sigma_{name} must have shape [{len(mu)}, {len(mu)}] to match mu_{name}, got {list(sigma.shape)}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu_{name} or sigma_{name} contains NaN or infinite values")
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * np.abs(sigma).max(initial=0.0):
        raise ValueError(f"sigma_{name} is not symmetric, so it is not a covariance matrix")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues count as 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _check_against_sqrtm(sigma_a: np.ndarray, sigma_b: np.ndarray, trace: float) -> None:
    """Warn when scipy's sqrtm of sigma_a @ sigma_b has a trace other than `trace`; skipped without scipy."""
    try:
        from scipy import linalg
    except ImportError:
        return
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # sqrtm's own complaints about singular input: the comparison reports them
        try:
            reference = float(np.trace(linalg.sqrtm(sigma_a @ sigma_b)).real)
        except (ValueError, np.linalg.LinAlgError):
            reference = float("nan")
    difference = abs(reference - trace)
    if not difference <= SQRTM_CHECK_RTOL * max(trace, np.finfo(np.float64).tiny):
        warnings.warn(
            f"scipy.linalg.sqrtm gives tr((sigma_a sigma_b)^(1/2)) = {reference:.8g} but the eigendecomposition "
            f"gives {trace:.8g} (relative difference {difference / max(trace, 1e-300):.2g}); using the latter. sqrtm "
            f"is unreliable for near-singular covariances; if they are not, please report this",
            stacklevel=3,
        )


def frechet_distance(mu_a: Any, sigma_a: Any, mu_b: Any, sigma_b: Any, *, cross_check: bool = True) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b): a float >= 0, computed in float64.

    tr((sigma_a sigma_b)^(1/2)) is the sum of the square roots of the eigenvalues of sqrt_a sigma_b sqrt_a, with
    sqrt_a the symmetric square root of sigma_a: both matrices are symmetric PSD, so `eigh` is exact up to round-off
    and never goes complex, unlike scipy's sqrtm of the non-symmetric product sigma_a sigma_b on (near-)singular
    covariances (fadtk #38, pytorch-fid #103). With `cross_check` and scipy installed, sqrtm is computed as well and
    a relative disagreement above SQRTM_CHECK_RTOL warns. A round-off negative total is returned as 0.
    """
    mu_a, sigma_a = _check_statistics(mu_a, sigma_a, "a")
    mu_b, sigma_b = _check_statistics(mu_b, sigma_b, "b")
    if len(mu_a) != len(mu_b):
        raise ValueError(f"the two sets have different dimensions: {len(mu_a)} and {len(mu_b)}")
    sqrt_a = _psd_sqrt(sigma_a)
    eigenvalues = np.linalg.eigvalsh(sqrt_a @ sigma_b @ sqrt_a)
    trace_sqrt_product = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    if cross_check:
        _check_against_sqrtm(sigma_a, sigma_b, trace_sqrt_product)
    mean_difference = mu_a - mu_b
    distance = mean_difference @ mean_difference + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product
    return max(float(distance), 0.0)


def fad(embeddings_a: Any, embeddings_b: Any, *, cross_check: bool = True) -> float:
    """FAD between two sets of embeddings [n_a, dim] and [n_b, dim] (numpy arrays or torch tensors)."""
    a = _as_embeddings(embeddings_a, "embeddings_a")
    b = _as_embeddings(embeddings_b, "embeddings_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings_a has dimension {a.shape[1]} but embeddings_b has {b.shape[1]}")
    return frechet_distance(*embedding_statistics(a), *embedding_statistics(b), cross_check=cross_check)


@dataclass(frozen=True)
class FADInf:
    """FAD extrapolated to an infinitely large evaluation set, from the fit FAD(n) = slope / n + score."""

    score: float  # the intercept: FAD as n -> infinity (an extrapolation, so it can be slightly negative)
    slope: float  # how much of FAD is sample-size bias: FAD(n) - score = slope / n
    r2: float  # goodness of the linear fit in 1/n; well below 1 means the extrapolation is not to be trusted
    points: tuple[tuple[int, float], ...]  # the (n, FAD) pairs the line was fitted to


def fad_inf(
    embeddings_a: Any,
    embeddings_b: Any,
    num_points: int = 15,
    min_n: int | None = None,
    seed: int = 0,
    *,
    cross_check: bool = True,
) -> FADInf:
    """FAD-inf (Chong & Forsyth 2020; fadtk's `score_inf`): FAD with the 1/n sample-size bias of set b removed.

    `embeddings_a` is the reference set, used whole. FAD is computed against random subsets of `embeddings_b` of
    `num_points` sizes n spread evenly from `min_n` (default: the larger of 2 x dim and len(b) / 10, so that the
    1/n regime holds) to len(b); a least-squares line in 1/n gives the intercept. Subsets are drawn without
    replacement, as in Chong & Forsyth: each one is then a sample of b's distribution, whereas resampling with
    replacement (fadtk) draws from the n_b-point empirical distribution and extrapolates towards plain FAD at n_b.
    The bias of the reference set's own statistics is not removed, so it should be large.
    """
    a = _as_embeddings(embeddings_a, "embeddings_a")
    b = _as_embeddings(embeddings_b, "embeddings_b")
    n_b, dim = b.shape
    if a.shape[1] != dim:
        raise ValueError(f"embeddings_a has dimension {a.shape[1]} but embeddings_b has {dim}")
    if min_n is None:
        min_n = max(2 * dim, n_b // 10)
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2 to fit a line, got {num_points}")
    if not 2 <= min_n < n_b:
        raise ValueError(
            f"min_n must lie in [2, len(embeddings_b)) = [2, {n_b}), got {min_n}; pass a smaller min_n or more "
            f"embeddings (by default min_n is max(2 * dim, len(b) // 10))"
        )
    stats_a = embedding_statistics(a)
    rng = np.random.default_rng(seed)
    sizes = np.linspace(min_n, n_b, num_points).round().astype(int)
    fads = np.array(
        [
            frechet_distance(
                *stats_a, *embedding_statistics(b[rng.choice(n_b, n, replace=False)]), cross_check=cross_check
            )
            for n in sizes
        ]
    )
    inverse_sizes = 1.0 / sizes
    slope, intercept = np.polyfit(inverse_sizes, fads, 1)
    residual = np.sum((fads - (slope * inverse_sizes + intercept)) ** 2)
    spread = np.sum((fads - fads.mean()) ** 2)
    r2 = 1.0 - residual / spread if spread > 0 else 1.0
    return FADInf(
        score=float(intercept),
        slope=float(slope),
        r2=float(r2),
        points=tuple((int(n), float(f)) for n, f in zip(sizes, fads, strict=True)),
    )


def reference_statistics(
    key: str, compute: Callable[[], Any], cache_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """FAD statistics (mu, sigma) of a reference set, computed once per `key` and cached in `cache_dir`.

    `key` must name everything the embeddings depend on; the caller builds it, e.g. from the dataset fingerprint,
    the embedder name and its sample rate. Its sha256 names the safetensors file, which also records the key in
    its metadata. `compute()` returns the reference embeddings [n_samples, dim] and runs only when the file does not
    exist yet. The file is written under a temporary name and renamed into place, so a concurrent reader (another
    rank) never sees a partial file; concurrent writers write identical contents and the last rename wins.
    """
    path = Path(cache_dir) / f"fad_reference_{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return tensors["mu"], tensors["sigma"]
    mu, sigma = embedding_statistics(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; the cache may be shared
        save_file({"mu": mu, "sigma": sigma}, temporary, metadata={"key": key})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return mu, sigma
