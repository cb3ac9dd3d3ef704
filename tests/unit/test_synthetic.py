"""The seeded synthetic music dataset: determinism, layout, difficulty, quality and pitch."""

import math
import time

import datasets
import numpy as np
import pytest
from scipy.stats import spearmanr

from hf_audio_trainer.data.synthetic import (
    DEGRADATIONS,
    DEGRADED_NOISE_LEVEL,
    MAX_NOISE,
    MIN_NOISE,
    _exp_decay,
    _sin_cos,
    difficulty_score,
    make_clip,
    make_synthetic_dataset,
    midi_to_hz,
    note_name,
)


@pytest.fixture(scope="module")
def full():
    """The default 2,000-clip dataset, timed once and shared by the statistical tests."""
    start = time.perf_counter()
    ds = make_synthetic_dataset()
    return ds, time.perf_counter() - start


@pytest.fixture(scope="module")
def full_train(full):
    return full[0]["train"]


def _arrays(split: datasets.Dataset) -> dict[int, np.ndarray]:
    return {row["clip_id"]: row["audio"]["array"] for row in split.with_format("numpy")}


def test_default_dataset_is_fast_and_split_95_5(full):
    ds, seconds = full
    assert seconds < 30, f"2000 clips took {seconds:.1f} s"
    assert (len(ds["train"]), len(ds["validation"])) == (1900, 100)


def test_features_are_the_decoded_audio_layout(full_train):
    audio = full_train.features["audio"]
    assert audio["array"].feature.dtype == "float32"
    assert audio["sampling_rate"].dtype == "int32"
    row = full_train[0]
    assert set(row["audio"]) == {"array", "sampling_rate"}
    assert row["audio"]["sampling_rate"] == 16000


def test_same_seed_same_audio_and_different_seed_different_audio():
    a = make_synthetic_dataset(num_clips=12, seed=3)
    b = make_synthetic_dataset(num_clips=12, seed=3)
    c = make_synthetic_dataset(num_clips=12, seed=4)
    for split in ("train", "validation"):
        assert a[split].data.table.equals(b[split].data.table)
    arrays_a = {**_arrays(a["train"]), **_arrays(a["validation"])}
    arrays_c = {**_arrays(c["train"]), **_arrays(c["validation"])}
    assert all(len(arrays_a[i]) != len(arrays_c[i]) or not np.array_equal(arrays_a[i], arrays_c[i]) for i in range(12))


def test_clip_does_not_depend_on_num_clips():
    small = make_synthetic_dataset(num_clips=6, seed=1)
    large = make_synthetic_dataset(num_clips=20, seed=1)
    small_arrays = {**_arrays(small["train"]), **_arrays(small["validation"])}
    large_arrays = {**_arrays(large["train"]), **_arrays(large["validation"])}
    assert sorted(small_arrays) == list(range(6))
    for i, array in small_arrays.items():
        np.testing.assert_array_equal(array, large_arrays[i])
        np.testing.assert_array_equal(array, make_clip(i, seed=1).array)


def test_split_sizes_are_disjoint_and_cover_all_clips():
    ds = make_synthetic_dataset(num_clips=40, validation_fraction=0.1, seed=0)
    train_ids, val_ids = set(ds["train"]["clip_id"]), set(ds["validation"]["clip_id"])
    assert (len(train_ids), len(val_ids)) == (36, 4)
    assert train_ids | val_ids == set(range(40))
    assert make_synthetic_dataset(num_clips=2, validation_fraction=0.05)["validation"].num_rows == 1
    tiny = make_synthetic_dataset(num_clips=1)
    assert (tiny["train"].num_rows, tiny["validation"].num_rows) == (1, 0)


def test_durations_lengths_and_levels(full_train):
    sr = 16000
    for row in full_train.select(range(0, 1900, 7)).with_format("numpy"):
        array = row["audio"]["array"]
        assert array.dtype == np.float32
        assert 0.5 - 1 / sr <= row["duration"] <= 3.0 + 1 / sr
        assert len(array) == round(row["duration"] * sr)
        peak = np.abs(array).max()
        assert np.isfinite(array).all()
        assert 0.4 < peak < 1.0


def test_other_sample_rate_and_duration_range():
    ds = make_synthetic_dataset(num_clips=8, sample_rate=8000, min_duration=1.0, max_duration=1.5)
    for row in ds["train"]:
        assert row["audio"]["sampling_rate"] == 8000
        assert 1.0 - 1 / 8000 <= row["duration"] <= 1.5 + 1 / 8000
        assert len(row["audio"]["array"]) == round(row["duration"] * 8000)


def test_difficulty_formula_by_hand():
    assert difficulty_score(1, 0.0, 0.0) == 0.0
    assert difficulty_score(4, MAX_NOISE, 5.0) == pytest.approx(1.0)
    assert difficulty_score(4, 1.0, 50.0) == 1.0  # clipped
    # polyphony 3 -> 2/3; noise at the decibel midpoint -> 1/2; 2.5 notes/s -> 1/2
    mid_noise = math.sqrt(MIN_NOISE * MAX_NOISE)
    assert difficulty_score(3, mid_noise, 2.5) == pytest.approx(0.4 * 2 / 3 + 0.35 * 0.5 + 0.25 * 0.5)


def test_difficulty_matches_its_inputs_and_spreads(full_train):
    diff = np.asarray(full_train["difficulty"])
    assert diff.min() >= 0 and diff.max() <= 1
    for row in full_train.remove_columns("audio").select(range(0, 1900, 50)):
        expected = difficulty_score(row["polyphony"], row["noise_level"], row["notes_per_second"])
        assert row["difficulty"] == pytest.approx(expected, abs=1e-5)
    assert spearmanr(diff, full_train["polyphony"]).statistic > 0.5
    assert spearmanr(diff, full_train["noise_level"]).statistic > 0.3
    # Spread over the range, not bunched around the middle.
    assert diff.std() > 0.15
    assert (diff < 0.25).mean() > 0.1 and (diff > 0.6).mean() > 0.1
    assert set(full_train["polyphony"]) == {1, 2, 3, 4}


def test_quality_follows_noise_and_degradation(full_train):
    quality = full_train["quality"]
    assert set(quality) == {"clean", "degraded"}
    assert 0.15 < quality.count("degraded") / len(quality) < 0.6
    for row in full_train.remove_columns("audio").select(range(0, 1900, 5)):
        degraded_by_effect = any(d in row["description"] for d in DEGRADATIONS)
        noisy = row["noise_level"] >= DEGRADED_NOISE_LEVEL
        assert (row["quality"] == "degraded") == (degraded_by_effect or noisy), row["description"]


def test_descriptions_name_kind_timbre_and_tempo(full_train):
    phrases = {"sine": "sine tone", "saw": "sawtooth", "square": "square-wave", "pluck": "plucked string"}
    for row in full_train.remove_columns("audio").select(range(40)):
        assert row["kind"] in row["description"]
        if row["timbre"] in phrases:
            assert phrases[row["timbre"]] in row["description"]
        if row["kind"] in ("melody", "arpeggio"):
            assert f"{row['bpm']} bpm" in row["description"]
            assert f"of {len(row['frequencies'])} notes" in row["description"]
        if row["noise_level"] == 0:
            assert "clean" in row["description"]
    assert set(full_train["kind"]) == {"note", "chord", "melody", "arpeggio"}
    assert set(full_train["timbre"]) >= {"sine", "saw", "square", "pluck"}


def test_note_names_and_frequencies():
    assert note_name(69) == "A4" and note_name(60) == "C4" and note_name(61) == "C#4"
    assert midi_to_hz(69) == 440.0
    assert midi_to_hz(81) == pytest.approx(880.0)
    assert midi_to_hz(60) == pytest.approx(261.6256, abs=1e-3)


def test_all_frequencies_are_equal_tempered_pitches(full_train):
    for freqs in full_train.select(range(0, 1900, 19))["frequencies"]:
        midi = 69 + 12 * np.log2(np.asarray(freqs) / 440.0)
        np.testing.assert_allclose(midi, np.round(midi), atol=1e-4)
        assert midi.min() >= 48 and midi.max() <= 96


def test_single_notes_have_their_fft_peak_at_the_note_frequency():
    checked = 0
    for i in range(300):
        clip = make_clip(i)
        if clip.kind != "note" or "low-passed" in clip.description:
            continue
        spectrum = np.abs(np.fft.rfft(clip.array * np.hanning(len(clip.array))))
        peak_hz = np.argmax(spectrum) * clip.sample_rate / len(clip.array)
        expected = clip.frequencies[0]
        assert abs(peak_hz - expected) < max(2.0, 0.01 * expected), (clip.description, peak_hz, expected)
        checked += 1
    assert checked >= 20


def test_clean_sine_note_is_a_pure_tone_with_an_onset():
    clip = next(
        c
        for c in (make_clip(i) for i in range(500))
        if c.kind == "note" and c.timbre == "sine" and c.quality == "clean" and c.noise_level == 0
    )
    x = clip.array
    # The note starts after a short silence and ramps up, so the first sample is silent.
    assert abs(x[0]) < 1e-3
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    peak = np.argmax(spectrum)
    # Nearly all energy sits within a few bins of the fundamental.
    assert spectrum[max(0, peak - 4) : peak + 5].sum() / spectrum.sum() > 0.95


@pytest.mark.parametrize(("n", "dt"), [(1, 0.1), (1023, 0.0273), (1025, 0.3), (48000, 0.0611)])
def test_block_sin_cos_and_decay_match_numpy(n, dt):
    """The outer-product shortcuts used for speed must equal the direct float64 functions."""
    i = np.arange(n)
    sin, cos = _sin_cos(n, dt)
    np.testing.assert_allclose(sin, np.sin(2 * np.pi * dt * i), atol=1e-6)
    np.testing.assert_allclose(cos, np.cos(2 * np.pi * dt * i), atol=1e-6)
    np.testing.assert_allclose(_exp_decay(n, 1 / 4000), np.exp(-i / 4000), atol=1e-6)
    assert sin.dtype == np.float32 and len(sin) == n


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="num_clips"):
        make_synthetic_dataset(num_clips=0)
    with pytest.raises(ValueError, match="min_duration"):
        make_synthetic_dataset(num_clips=2, min_duration=2.0, max_duration=1.0)
    with pytest.raises(ValueError, match="validation_fraction"):
        make_synthetic_dataset(num_clips=2, validation_fraction=1.0)
