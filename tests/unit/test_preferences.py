"""Preference data: each degradation measured on known signals, the synthetic pairs, and the dataset checks."""

import hashlib

import datasets
import numpy as np
import pytest

from hf_audio_trainer.data.preferences import (
    CONTINUATION_SECONDS,
    DEGRADATIONS,
    check_preference_columns,
    degrade,
    drop_identical_pairs,
    make_synthetic_preferences,
)
from hf_audio_trainer.data.synthetic import make_clip

SR = 16000


def _sine(freq: float = 440.0, seconds: float = 2.0, amplitude: float = 0.8) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """SNR of noisy against clean after removing the gain degrade applied (least squares, noise is uncorrelated)."""
    gain = np.dot(noisy, clean) / np.dot(clean, clean)
    residual = noisy - gain * clean
    return 10 * np.log10(np.sum((gain * clean) ** 2) / np.sum(residual**2))


def _dominant_hz(x: np.ndarray) -> float:
    """Peak of the Hann-windowed spectrum, zero-padded to 0.015 Hz bins."""
    nfft = 1 << 20
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=nfft))
    return float(np.argmax(spectrum) * SR / nfft)


def _cents(x: np.ndarray) -> float:
    # Only the first 1.8 s: a sharpened copy ends in a short silence.
    return 1200 * np.log2(_dominant_hz(x[: int(1.8 * SR)]) / 440.0)


def _crest(x: np.ndarray) -> float:
    return float(np.abs(x).max() / np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("kind", list(DEGRADATIONS))
def test_every_degradation_keeps_length_dtype_and_peak(kind):
    x = make_clip(3, seed=0).array * np.float32(0.7 / np.abs(make_clip(3, seed=0).array).max())
    out = degrade(x, SR, kind, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == x.shape and np.isfinite(out).all()
    assert np.abs(out).max() == pytest.approx(0.7, rel=1e-5)
    assert np.abs(out - x).max() > 0.01
    again = degrade(x, SR, kind, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    # A too-loud input comes back at peak 1.
    loud = degrade(x * np.float32(2.5), SR, kind, np.random.default_rng(0))
    assert np.abs(loud).max() <= 1.0 and np.abs(loud).max() == pytest.approx(1.0, rel=1e-5)


def test_noise_snr_is_5_to_10_db_and_scales_with_strength():
    x = _sine()
    snrs = [_snr_db(x, degrade(x, SR, "noise", np.random.default_rng(s))) for s in range(12)]
    assert min(snrs) > 4.8 and max(snrs) < 10.2, snrs
    assert max(snrs) - min(snrs) > 2, "the SNR should be drawn from the range, not fixed"
    # Strength 2 doubles the noise amplitude: the same draw at 6 dB less SNR.
    for s in range(3):
        weak = _snr_db(x, degrade(x, SR, "noise", np.random.default_rng(s)))
        strong = _snr_db(x, degrade(x, SR, "noise", np.random.default_rng(s), strength=2.0))
        assert weak - strong == pytest.approx(20 * np.log10(2), abs=0.3)


def test_detune_shifts_a_440_hz_sine_by_30_to_80_cents():
    x = _sine()
    assert abs(_cents(x)) < 0.5
    shifts = [_cents(degrade(x, SR, "detune", np.random.default_rng(s))) for s in range(10)]
    assert all(29 < abs(c) < 81 for c in shifts), shifts
    assert min(shifts) < 0 < max(shifts), "both flat and sharp"
    for s in range(3):
        full = _cents(degrade(x, SR, "detune", np.random.default_rng(s)))
        half = _cents(degrade(x, SR, "detune", np.random.default_rng(s), strength=0.5))
        assert half == pytest.approx(full / 2, abs=1.0)


def test_clip_flattens_peaks_and_restores_the_level():
    x = _sine()
    out = degrade(x, SR, "clip", np.random.default_rng(0))
    assert _crest(x) == pytest.approx(np.sqrt(2), rel=1e-3)
    # Clipped at 0.2-0.4 of its peak, a sine is nearly square: crest factor close to 1.
    assert _crest(out) < 1.2
    assert np.abs(out).max() == pytest.approx(0.8, rel=1e-5)
    assert np.mean(np.abs(out) > 0.8 - 1e-4) > 0.5
    # Strength lowers the clipping level further: more samples end up on the rails.
    harder = degrade(x, SR, "clip", np.random.default_rng(0), strength=2.0)
    assert np.mean(np.abs(harder) > 0.8 - 1e-4) > np.mean(np.abs(out) > 0.8 - 1e-4)


def test_degrade_rejects_bad_arguments():
    x, rng = _sine(seconds=0.1), np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"unknown degradation 'reverb'; choose one of \['noise', 'detune', 'clip'\]"):
        degrade(x, SR, "reverb", rng)
    with pytest.raises(ValueError, match="strength must be > 0"):
        degrade(x, SR, "noise", rng, strength=0)
    with pytest.raises(ValueError, match=r"1-D array\), got shape \(2, 1600\)"):
        degrade(np.stack([x, x]), SR, "noise", rng)


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_preferences(num_pairs=24, seed=0)


def _rows(split: datasets.Dataset) -> list[dict]:
    return list(split.with_format("numpy"))


def test_synthetic_splits_columns_and_sample_rate(pairs):
    assert (pairs["train"].num_rows, pairs["validation"].num_rows) == (22, 2)
    for split in pairs.values():
        assert split.column_names == ["prompt", "chosen", "rejected", "description", "degradation", "clip_id"]
        assert split.features["chosen"]["array"].feature.dtype == "float32"
        for row in _rows(split):
            for column in ("prompt", "chosen", "rejected"):
                assert row[column]["sampling_rate"] == SR
                assert row[column]["array"].dtype == np.float32
            assert len(row["prompt"]["array"]) == SR
            assert len(row["chosen"]["array"]) == len(row["rejected"]["array"])


def test_synthetic_prompt_and_chosen_are_the_clean_source_clip(pairs):
    shortest, longest = (1.0 + s for s in CONTINUATION_SECONDS)
    for row in _rows(pairs["train"]) + _rows(pairs["validation"]):
        source = make_clip(int(row["clip_id"]), SR, shortest, longest, seed=0)
        assert source.quality == "clean" and row["description"] == source.description
        assert len(row["prompt"]["array"]) + len(row["chosen"]["array"]) == len(source.array)
        np.testing.assert_array_equal(np.concatenate([row["prompt"]["array"], row["chosen"]["array"]]), source.array)


def test_synthetic_rejected_differs_and_degradations_cycle(pairs):
    rows = sorted(_rows(pairs["train"]) + _rows(pairs["validation"]), key=lambda r: int(r["clip_id"]))
    assert [r["degradation"] for r in rows] == ["noise", "detune", "clip"] * 8
    for row in rows:
        chosen, rejected = row["chosen"]["array"], row["rejected"]["array"]
        assert np.abs(chosen - rejected).max() > 0.01
        assert np.abs(rejected).max() == pytest.approx(np.abs(chosen).max(), rel=1e-5)


def test_synthetic_train_and_validation_share_no_source(pairs):
    def sources(split):
        return {(r["description"], hashlib.sha256(r["prompt"]["array"].tobytes()).hexdigest()) for r in _rows(split)}

    train, validation = sources(pairs["train"]), sources(pairs["validation"])
    assert len(train) == 22 and len(validation) == 2 and not train & validation
    assert not set(pairs["train"]["clip_id"]) & set(pairs["validation"]["clip_id"])


def test_synthetic_is_deterministic_and_seeded(pairs):
    again = make_synthetic_preferences(num_pairs=24, seed=0)
    for split in ("train", "validation"):
        assert again[split].data.table.equals(pairs[split].data.table)
    other = make_synthetic_preferences(num_pairs=24, seed=1)["train"]
    for a, b in zip(_rows(pairs["train"])[:5], _rows(other)[:5], strict=True):
        assert not np.array_equal(a["prompt"]["array"], b["prompt"]["array"])
    # Pair k does not depend on how many pairs were asked for.
    few = make_synthetic_preferences(num_pairs=6, seed=0, validation_fraction=0.0)
    assert few["validation"].num_rows == 0
    all_ids = sorted([*pairs["train"]["clip_id"], *pairs["validation"]["clip_id"]])
    assert list(few["train"]["clip_id"]) == all_ids[:6]


def test_synthetic_prompt_seconds_and_bad_arguments():
    short = make_synthetic_preferences(num_pairs=3, prompt_seconds=0.5)
    assert all(len(r["prompt"]["array"]) == SR // 2 for r in _rows(short["train"]))
    for kwargs, message in [
        ({"num_pairs": 0}, "num_pairs must be >= 1"),
        ({"prompt_seconds": 0}, "prompt_seconds must be > 0"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_synthetic_preferences(**kwargs)


def test_check_preference_columns():
    good = datasets.Dataset.from_dict({"prompt": [1], "chosen": [2], "rejected": [3]})
    check_preference_columns(good, require_prompt=True)
    with pytest.raises(ValueError) as error:
        check_preference_columns(datasets.Dataset.from_dict({"a": [1], "b": [2]}))
    assert str(error.value) == "the preference dataset needs 'chosen' and 'rejected' columns; found ['a', 'b']"
    no_prompt = good.remove_columns("prompt")
    check_preference_columns(no_prompt)
    with pytest.raises(ValueError, match="needs 'prompt', 'chosen' and 'rejected' columns; found"):
        check_preference_columns(no_prompt, require_prompt=True)
    splits = datasets.DatasetDict({"train": good, "test": good.remove_columns("rejected")})
    with pytest.raises(ValueError, match=r"\(split 'test'\) needs 'chosen' and 'rejected' columns; found \['prompt'"):
        check_preference_columns(splits)


def _audio(values: list[float]) -> dict:
    return {"array": values, "sampling_rate": SR}


def test_drop_identical_pairs_on_audio():
    ds = datasets.Dataset.from_dict(
        {
            "id": [0, 1, 2, 3, 4],
            "chosen": [_audio([0.1, 0.2]), _audio([0.1, 0.2]), _audio([0.5, -0.5, 0.0]), _audio([0.3]), _audio([1.0])],
            # Rows 0 and 2 are identical; row 3 is a prefix of its chosen, not the same.
            "rejected": [_audio([0.1, 0.2]), _audio([0.1, 0.3]), _audio([0.5, -0.5, 0.0]), _audio([0.3, 0.0])]
            + [_audio([-1.0])],
        }
    )
    kept, dropped = drop_identical_pairs(ds)
    assert dropped == 2 and list(kept["id"]) == [1, 3, 4]
    assert drop_identical_pairs(kept)[1] == 0


def test_drop_identical_pairs_compares_audio_files_without_decoding():
    files = [{"bytes": b"RIFF-a", "path": None}, {"bytes": b"RIFF-a", "path": None}, {"bytes": b"RIFF-b", "path": None}]
    ds = datasets.Dataset.from_dict({"chosen": files[:2], "rejected": [files[0], files[2]]})
    ds = ds.cast_column("chosen", datasets.Audio()).cast_column("rejected", datasets.Audio())
    kept, dropped = drop_identical_pairs(ds)
    assert dropped == 1 and kept.num_rows == 1
    assert isinstance(kept.features["chosen"], datasets.Audio) and kept.features["chosen"].decode


def test_drop_identical_pairs_on_codes_and_real_pairs(pairs):
    ds = datasets.Dataset.from_dict(
        {
            "id": [0, 1, 2, 3],
            "chosen_codes": [[[1, 2], [3, 4]], [[1, 2], [3, 4]], [[1, 2, 3, 4]], [[7, 8], [9, 9]]],
            # Row 2 has the same codes in another shape; rows 0 and 3 are identical.
            "rejected_codes": [[[1, 2], [3, 4]], [[1, 2], [3, 5]], [[1, 2], [3, 4]], [[7, 8], [9, 9]]],
        }
    )
    kept, dropped = drop_identical_pairs(ds)
    assert dropped == 2 and list(kept["id"]) == [1, 2]
    assert drop_identical_pairs(pairs["train"])[1] == 0
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected' columns; found \\['id', 'chosen_codes'\\]"):
        drop_identical_pairs(ds.remove_columns("rejected_codes"))
