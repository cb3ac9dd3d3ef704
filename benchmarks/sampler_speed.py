"""Cost of the curriculum sampler: building an epoch's order for 1,000,000 items, and per batch against a step.

    python benchmarks/sampler_speed.py

Prints the time to build the order per pacing (target: under 2 s for a million items), the sampler's cost per
batch as a fraction of one training step of the tiny default model (target: negligible), and the padding fraction
on the embedded data with and without --group_by_length.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.families.musicgen import build_decoder, lm_loss
from hf_audio_trainer.optim import build_optimizer


def order_time(pacing: str, n: int, batch: int, lengths=None) -> float:
    difficulties = np.random.default_rng(0).random(n)
    sampler = CurriculumSampler(difficulties, batch, pacing=pacing, curriculum_steps=1000, lengths=lengths)
    start = time.perf_counter()
    sampler.global_order(0)
    return time.perf_counter() - start


def step_time(batch: int = 16, steps: int = 20) -> float:
    rng = np.random.default_rng(0)
    codes = [{"codes": rng.integers(0, 256, (4, int(rng.integers(25, 150)))).tolist()} for _ in range(batch)]
    model = build_decoder(None, "tiny", 4, 256, 200, dropout=0.0)
    optimizer = build_optimizer(model, "adamw", lr=1e-3)
    data = CodesCollator(4, 256, 256, 50.0)(codes)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = lm_loss(model, data)
        (loss / data["num_items"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    n = 1_000_000
    for pacing in ["none", "linear", "root", "geometric", "step", "anti"]:
        print(f"order of {n:,} items, global batch 64, pacing {pacing:9s}: {order_time(pacing, n, 64):.2f} s")
    lengths = np.random.default_rng(1).integers(25, 150, n)
    print(f"order of {n:,} items, linear + group_by_length:        {order_time('linear', n, 64, lengths):.2f} s")
    # per batch: an epoch's order is built once, then each batch is a slice of it
    per_batch = order_time("linear", 2000, 16) / (2000 // 16)
    step = step_time()
    print(
        f"sampler per batch (2,000 clips, batch 16): {per_batch * 1e3:.3f} ms = {per_batch / step:.2%} of a "
        f"training step of the tiny model ({step * 1e3:.0f} ms)"
    )


def padding_fraction(lengths: np.ndarray, sampler: CurriculumSampler, micro: int) -> float:
    """Padded share of the [micro-batch x longest clip] grids an epoch is trained on."""
    batches = lengths[sampler.global_order(0).reshape(-1, micro)]
    return float(1 - batches.sum() / (batches.max(axis=1) * micro).sum())


def padding_report() -> None:
    from hf_audio_trainer.data.synthetic import make_synthetic_dataset

    train = make_synthetic_dataset(num_clips=2000)["train"]
    lengths = (np.asarray(train["duration"]) * 50).astype(int)  # frames at 50 frames/s
    difficulty = train["difficulty"]
    for pacing in ["none", "linear"]:
        plain = CurriculumSampler(difficulty, 16, pacing=pacing, curriculum_steps=100)
        grouped = CurriculumSampler(difficulty, 16, pacing=pacing, curriculum_steps=100, lengths=lengths)
        print(
            f"embedded data, batch 16, {pacing:6s}: padding {padding_fraction(lengths, plain, 16):.1%} without "
            f"--group_by_length, {padding_fraction(lengths, grouped, 16):.1%} with it"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
    padding_report()
