"""Windows of long tracks: a track is tokenized whole once, and each draw trains on one segment of it.

The window a draw takes is a pure function of (seed, epoch, row), so resuming at any step takes the same windows as
a straight run, and every part of a track is drawn: a track `n` windows long (rounded up) has `n` evenly spaced
windows that cover it, the first `n` epochs draw each of them once (in an order rotated by a random phase per
track), and later rounds of `n` epochs draw the same grid shifted at random by up to half its spacing (other cut
points). Validation takes one fixed window per track, its middle.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from datasets import Dataset

from hf_audio_trainer.curriculum import PACING

WINDOW_SALT = 7  # keeps window draws independent of the other (seed, epoch) streams (data order, dropout)
MIN_SEGMENT_FRAMES = 8  # the shortest window a sequence-length curriculum starts from


def window_start(seed: int, epoch: int, row: int, num_frames: int, segment_frames: int) -> int:
    """First frame of the window of `segment_frames` that draw (epoch, row) takes of a track of `num_frames`."""
    spare = num_frames - segment_frames
    if spare <= 0:  # a short clip is used whole
        return 0
    # n evenly spaced windows cover the track (their spacing is at most a window); each round of n epochs draws
    # each of them once, in an order rotated by the track's phase; later rounds shift the grid at random
    n = math.ceil(num_frames / segment_frames)
    spacing = spare / (n - 1)
    phase = int(np.random.default_rng([seed, row, WINDOW_SALT]).integers(n))
    which, round_ = (epoch + phase) % n, epoch // n
    shift = 0.0
    if round_ > 0:
        shift = float(np.random.default_rng([seed, round_, row, WINDOW_SALT]).uniform(-spacing / 2, spacing / 2))
    return int(min(max(round(which * spacing + shift), 0), spare))


def take_window(codes: list, start: int, segment_frames: int) -> list:
    """Frames [start, start + segment_frames) of every codebook of a [codebooks][frames] list."""
    return [codebook[start : start + segment_frames] for codebook in codes]


def middle_windows(dataset: Dataset, segment_frames: int, split: str = "validation", column: str = "codes") -> Dataset:
    """Each track cut to its middle window (tracks no longer than a window stay whole): fixed validation windows
    (`column`: the codes, or a continuous family's latents)."""
    if not len(dataset) or max(dataset["num_frames"]) <= segment_frames:
        return dataset

    def cut(batch: dict) -> dict:
        codes = []
        for track, frames in zip(batch[column], batch["num_frames"], strict=True):
            start = max(frames - segment_frames, 0) // 2
            codes.append(take_window(track, start, segment_frames))
        return {column: codes, "num_frames": [min(f, segment_frames) for f in batch["num_frames"]]}

    return dataset.map(cut, batched=True, batch_size=256, desc=f"Cutting {split} tracks to their middle window")


def segment_schedule(
    segment_frames: int, pacing: str | None = None, start_fraction: float = 0.2, steps: int = 1000
) -> Callable[[int], int]:
    """Window length at each optimizer step: fixed, or growing with a pacing's competence (a sequence-length
    curriculum: short windows first, the full one from `steps` on)."""
    if pacing is None or pacing == "none":
        return lambda step: segment_frames
    grow = PACING[pacing]
    shortest = min(MIN_SEGMENT_FRAMES, segment_frames)

    def frames_at(step: int) -> int:
        competence = min(grow(min(step / steps, 1.0), start_fraction), 1.0)
        return max(shortest, min(segment_frames, round(competence * segment_frames)))

    return frames_at
