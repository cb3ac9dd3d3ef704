"""Time of FAD on two sets of 10,000 x 128 embeddings, against np.cov of the same data, measured in one run.

    python benchmarks/fad_speed.py [--num_samples 10000] [--dim 128] [--repeats 5]

Prints the median seconds of `fad()` (with and without the scipy sqrtm cross-check), of its parts, and of the
baseline (`np.cov` of both sets, which FAD cannot avoid), and the ratios. Target: FAD on 10,000 x 128 under 1 s.
BLAS threads fight over busy cores: on a loaded machine compare with OPENBLAS_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

import numpy as np

from hf_audio_trainer.metrics.fad import embedding_statistics, fad, frechet_distance


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: BLAS thread pools, scipy import
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)  # correlated dimensions
    a = rng.standard_normal((args.num_samples, args.dim)) @ mixing
    b = rng.standard_normal((args.num_samples, args.dim)) @ mixing + 0.1
    stats_a, stats_b = embedding_statistics(a), embedding_statistics(b)
    warnings.simplefilter("error")  # a cross-check disagreement on this well-conditioned data would be a bug

    timings = {
        "baseline: np.cov of both sets": _median_seconds(
            lambda: (np.cov(a, rowvar=False), np.cov(b, rowvar=False)), args.repeats
        ),
        "fad()": _median_seconds(lambda: fad(a, b), args.repeats),
        "fad(cross_check=False)": _median_seconds(lambda: fad(a, b, cross_check=False), args.repeats),
        "  embedding_statistics x2": _median_seconds(
            lambda: (embedding_statistics(a), embedding_statistics(b)), args.repeats
        ),
        "  frechet_distance (eigh only)": _median_seconds(
            lambda: frechet_distance(*stats_a, *stats_b, cross_check=False), args.repeats
        ),
        "  frechet_distance (+ sqrtm check)": _median_seconds(
            lambda: frechet_distance(*stats_a, *stats_b), args.repeats
        ),
    }
    baseline = timings["baseline: np.cov of both sets"]
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(
        f"FAD on 2 x {args.num_samples:,} x {args.dim} float64 embeddings, median of {args.repeats}, "
        f"{os.cpu_count()} CPUs, BLAS threads: {threads}; FAD = {fad(a, b):.6f}"
    )
    for name, seconds in timings.items():
        print(f"  {name:36s} {seconds:8.4f} s  {seconds / baseline:6.2f} x baseline")
    verdict = "meets" if timings["fad()"] < 1.0 else "misses"
    print(f"fad() {verdict} the 1 s target: {timings['fad()']:.3f} s")


if __name__ == "__main__":
    main()
