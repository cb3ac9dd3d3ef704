"""The default preference scorer against known spectral flatness values."""

import numpy as np
import pytest

from hf_audio_trainer.alignment import tonal_clarity


def test_tonal_clarity_ranks_a_tone_above_noisy_and_clipped_versions_and_noise():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(sr)
    noisy = tone + 0.1 * noise
    clipped = np.clip(tone, -0.1, 0.1)
    scores = [tonal_clarity(x, sr) for x in (tone, noisy, clipped, noise)]
    assert scores[0] > max(scores[1], scores[2]) and min(scores[1], scores[2]) > scores[3]
    # white Gaussian noise: each periodogram bin is exponential, whose geometric / arithmetic mean is e^-gamma
    assert scores[3] == pytest.approx(-np.exp(-np.euler_gamma), abs=0.03)
    assert scores[0] > -0.01  # a pure tone is nowhere near flat
    with pytest.raises(ValueError, match="needs at least"):
        tonal_clarity(tone[:100], sr)
