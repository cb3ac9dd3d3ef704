"""Audio tokenizers: mel k-means (fit, frames, codes, save/load, quality, audible decode) and the EnCodec adapter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_audio_trainer.codecs import (
    TOKENIZERS,
    AudioTokenizer,
    EncodecTokenizer,
    MelKMeansTokenizer,
    load_audio_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SR = 16000
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
HOP = 320


def _clips(num_clips: int, seed: int) -> list[np.ndarray]:
    """Varied 0.3-1 s clips: harmonic tones with vibrato, chirps and decaying noise, each with a fade."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(num_clips):
        n = int(rng.uniform(0.3, 1.0) * SR)
        t = np.arange(n) / SR
        if i % 3 == 0:
            phase = 2 * np.pi * np.cumsum(rng.uniform(100, 1000) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / SR
            x = sum(rng.uniform(0, 0.3) / k * np.sin(k * phase) for k in range(1, 6))
        elif i % 3 == 1:
            f0, f1 = rng.uniform(100, 4000, 2)
            x = 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))
        else:
            x = 0.3 * rng.standard_normal(n) * np.exp(-t * rng.uniform(1, 10))
        clips.append((x * np.linspace(1, rng.uniform(0, 1), n) + 0.003 * rng.standard_normal(n)).astype(np.float32))
    return clips


def _tones() -> list[np.ndarray]:
    """Half-second sines and harmonic tones, 6 per octave from 110 Hz to 1760 Hz, at varied levels."""
    rng = np.random.default_rng(0)
    t = np.arange(SR // 2) / SR
    clips = []
    for f in np.geomspace(110, 1760, 25):
        level = rng.uniform(0.1, 0.5)
        clips.append(level * np.sin(2 * np.pi * f * t))
        clips.append(level * sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 5)) / 2)
    return [c.astype(np.float32) for c in clips]


@pytest.fixture(scope="module")
def train_clips() -> list[np.ndarray]:
    return _clips(60, seed=0)


@pytest.fixture(scope="module")
def tokenizer(train_clips) -> MelKMeansTokenizer:
    return MelKMeansTokenizer.fit(train_clips, num_codebooks=4, codebook_size=32, seed=0)


def _quantise(features: torch.Tensor, codebooks: torch.Tensor) -> list[float]:
    """Mean squared residual after each codebook, by brute-force nearest centroid (independent of the library)."""
    residual, errors = features.clone(), []
    for centroids in codebooks:
        residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]
        errors.append(residual.pow(2).mean().item())
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# Mel k-means
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_is_deterministic_for_a_seed(train_clips, tokenizer):
    again = MelKMeansTokenizer.fit(train_clips, num_codebooks=4, codebook_size=32, seed=0)
    other_seed = MelKMeansTokenizer.fit(train_clips, num_codebooks=4, codebook_size=32, seed=1)
    assert torch.equal(again.codebooks, tokenizer.codebooks)
    assert torch.equal(again.mean, tokenizer.mean) and torch.equal(again.std, tokenizer.std)
    assert not torch.equal(other_seed.codebooks, tokenizer.codebooks)
    # A generator (not a list) is accepted, as a streamed dataset would give.
    streamed = MelKMeansTokenizer.fit(iter(train_clips), num_codebooks=4, codebook_size=32, seed=0)
    assert torch.equal(streamed.codebooks, tokenizer.codebooks)


def test_shapes_rates_and_sizes(tokenizer):
    assert isinstance(tokenizer, AudioTokenizer)
    assert tokenizer.codebooks.shape == (4, 32, 64)
    assert (tokenizer.num_codebooks, tokenizer.codebook_size, tokenizer.n_mels) == (4, 32, 64)
    assert (tokenizer.sample_rate, tokenizer.hop_length) == (SR, HOP)
    assert tokenizer.frame_rate == 50.0 and tokenizer.frame_rate <= 100


@pytest.mark.parametrize("num_samples", [HOP, 2 * HOP - 1, 2 * HOP, 1000, SR, SR + 123])
def test_encode_makes_num_samples_over_hop_frames_in_range(tokenizer, num_samples):
    wave = np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32) * 0.1
    codes = tokenizer.encode(wave)
    assert tokenizer.num_frames(num_samples) == num_samples // HOP
    assert codes.dtype == torch.long
    assert codes.shape == (4, num_samples // HOP)
    assert codes.min() >= 0 and codes.max() < tokenizer.codebook_size
    assert torch.equal(tokenizer.encode(torch.from_numpy(wave)), codes)  # numpy and torch input agree


def test_clip_shorter_than_one_frame(tokenizer):
    assert tokenizer.num_frames(HOP - 1) == 0
    with pytest.raises(ValueError, match="shorter than one frame"):
        tokenizer.encode(np.zeros(HOP - 1, dtype=np.float32))
    # encode_batch reports it as 0 frames, so a dataset pass can name every short clip at once.
    codes = tokenizer.encode_batch([np.zeros(HOP - 1, np.float32), np.zeros(3 * HOP, np.float32)])
    assert [c.shape for c in codes] == [(4, 0), (4, 3)]
    assert tokenizer.encode_batch([]) == []
    with pytest.raises(ValueError, match="mono"):
        tokenizer.encode(np.zeros((2, SR), dtype=np.float32))


def test_encode_batch_matches_encode_one_by_one(tokenizer):
    # Batching pads clips of different lengths together; that padding must not change any code.
    clips = _clips(12, seed=5)
    batched = tokenizer.encode_batch(clips)
    for clip, codes in zip(clips, batched, strict=True):
        assert torch.equal(codes, tokenizer.encode(clip))


def test_save_and_load_give_identical_codes_and_audio(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_type"] == "mel_kmeans"
    assert {k: config[k] for k in ("num_codebooks", "codebook_size", "n_mels", "n_fft", "hop_length")} == {
        "num_codebooks": 4,
        "codebook_size": 32,
        "n_mels": 64,
        "n_fft": 1024,
        "hop_length": HOP,
    }
    assert config["fit"]["num_clips"] == 60
    assert (tmp_path / "tokenizer.safetensors").is_file()
    clip = _clips(1, seed=9)[0]
    for loaded in (MelKMeansTokenizer.from_pretrained(tmp_path), load_audio_tokenizer(str(tmp_path))):
        assert isinstance(loaded, MelKMeansTokenizer)
        assert torch.equal(loaded.encode(clip), tokenizer.encode(clip))
        codes = tokenizer.encode(clip)
        assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))


def test_residual_codebooks_lower_the_error_and_kmeans_beats_baselines(tokenizer):
    held_out = torch.cat([tokenizer.features(c) for c in _clips(20, seed=1)])
    errors = _quantise(held_out, tokenizer.codebooks)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.6 * errors[0]
    # Trivial baselines: predicting the mean frame (0 after normalisation), and 32 random training frames.
    mean_error = held_out.pow(2).mean().item()
    train = torch.cat([tokenizer.features(c) for c in _clips(60, seed=0)])
    random_codebook = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32]]
    random_error = _quantise(held_out, random_codebook[None])[0]
    assert errors[0] < 0.6 * mean_error
    assert errors[0] < 0.9 * random_error


def test_encode_uses_the_nearest_centroids(tokenizer):
    # The library's chunked ||a||^2 - 2ab + ||b||^2 search must agree with brute-force cdist.
    clip = _clips(1, seed=3)[0]
    residual, expected = tokenizer.features(clip), []
    for centroids in tokenizer.codebooks:
        index = torch.cdist(residual, centroids).argmin(1)
        expected.append(index)
        residual = residual - centroids[index]
    assert torch.equal(tokenizer.encode(clip), torch.stack(expected))


def test_decode_of_a_440_hz_sine_is_audible_at_440_hz():
    tok = MelKMeansTokenizer.fit(_tones(), num_codebooks=4, codebook_size=32, seed=0)
    t = np.arange(SR) / SR
    sine = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    codes = tok.encode(sine)
    audio = tok.decode(codes)
    assert audio.dtype == torch.float32 and audio.shape == (codes.shape[1] * HOP,)
    assert torch.equal(tok.decode(codes), audio)  # seeded Griffin-Lim: the same codes give the same audio
    spectrum = np.abs(np.fft.rfft(audio.numpy() * np.hanning(len(audio))))
    peak_hz = np.fft.rfftfreq(len(audio), 1 / SR)[spectrum.argmax()]
    # One mel band apart at 440 Hz: the distance between neighbouring filter centres is the resolution available.
    centres_hz = tok.mel_fb.argmax(0).float() * SR / 1024
    band_hz = float(centres_hz[centres_hz > 440].min() - centres_hz[centres_hz <= 440].max())
    assert abs(peak_hz - 440) <= band_hz, (peak_hz, band_hz)
    rms = audio.pow(2).mean().sqrt().item()
    assert rms > 0.1 * 0.3 / np.sqrt(2), rms


def test_decode_rejects_bad_codes(tokenizer):
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(torch.full((4, 3), 32))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))
    assert tokenizer.decode(torch.zeros(4, 0, dtype=torch.long)).shape == (0,)


def test_fit_on_too_little_audio_says_how_much_it_found():
    with pytest.raises(ValueError, match=r"found only 10 frames .* smaller codebook_size"):
        MelKMeansTokenizer.fit([np.zeros(10 * HOP + 5, dtype=np.float32)], codebook_size=16)


# ---------------------------------------------------------------------------------------------------------------------
# Loading by type
# ---------------------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert TOKENIZERS == {"mel_kmeans": MelKMeansTokenizer, "encodec": EncodecTokenizer}


def test_unknown_tokenizer_type_lists_the_valid_ones(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_type": "wavtokenizer"}))
    with pytest.raises(ValueError, match=r"'wavtokenizer'.*\['encodec', 'mel_kmeans'\]"):
        load_audio_tokenizer(str(tmp_path))


def test_a_folder_without_a_tokenizer_says_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*EnCodec") as info:
        load_audio_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="cannot load an audio tokenizer"):
        load_audio_tokenizer(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------------------------
# EnCodec adapter, on a tiny randomly initialised model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encodec_folder(tmp_path_factory):
    """A tiny EnCodec saved the way transformers saves one (config.json + model.safetensors, no tokenizer files)."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    # hop 16 at 8 kHz -> 500 frames/s; 6 bits per code -> 3 kbps per codebook, so 3.0 -> 1 codebook, 6.0 -> 2.
    config = EncodecConfig(
        sampling_rate=8000,
        upsampling_ratios=[4, 4],
        hidden_size=16,
        num_filters=4,
        num_lstm_layers=1,
        codebook_size=64,
        target_bandwidths=[3.0, 6.0],
    )
    model = EncodecModel(config)
    with torch.no_grad():
        # transformers initialises codebooks to zeros (every code would be 0): seed them from encoder outputs.
        frames = model.encoder(0.1 * torch.randn(1, 1, 8000))[0].T
        for k, layer in enumerate(model.quantizer.layers):
            picked = frames[torch.randperm(len(frames))[:64]]
            layer.codebook.embed.copy_(picked if k == 0 else 0.5 * (picked - frames.mean(0)))
    folder = tmp_path_factory.mktemp("encodec")
    model.save_pretrained(folder)
    return folder


def test_encodec_shapes_ranges_and_lengths(encodec_folder):
    tok = EncodecTokenizer.from_pretrained(str(encodec_folder), bandwidth=6.0)
    assert (tok.sample_rate, tok.hop_length, tok.frame_rate) == (8000, 16, 500.0)
    assert (tok.num_codebooks, tok.codebook_size) == (2, 64)
    wave = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 0.1
    codes = tok.encode(wave)
    assert codes.dtype == torch.long
    assert codes.shape == (2, tok.num_frames(1000)) == (2, 63)  # EnCodec pads the last partial frame
    assert codes.min() >= 0 and codes.max() < 64
    assert len(codes.unique()) > 1
    audio = tok.decode(codes)
    assert audio.dtype == torch.float32 and audio.shape == (63 * 16,)
    assert abs(len(audio) - len(wave)) < tok.hop_length
    assert [c.shape for c in tok.encode_batch([wave, wave[:500]])] == [(2, 63), (2, 32)]


def test_encodec_bandwidth_sets_the_number_of_codebooks(encodec_folder):
    wave = np.random.default_rng(1).standard_normal(800).astype(np.float32) * 0.1
    low = EncodecTokenizer.from_pretrained(str(encodec_folder))  # the model's default: its smallest bandwidth
    high = EncodecTokenizer.from_pretrained(str(encodec_folder), bandwidth=6.0)
    assert low.bandwidth == 3.0 and low.num_codebooks == 1 and low.encode(wave).shape == (1, 50)
    assert torch.equal(high.encode(wave)[:1], low.encode(wave))  # residual VQ: more bandwidth adds codebooks
    with pytest.raises(ValueError, match=r"target_bandwidths \[3.0, 6.0\]"):
        EncodecTokenizer.from_pretrained(str(encodec_folder), bandwidth=12.0)


def test_encodec_round_trip_through_save_and_load(encodec_folder, tmp_path):
    plain = load_audio_tokenizer(str(encodec_folder))  # a bare transformers EnCodec folder loads too
    assert isinstance(plain, EncodecTokenizer)
    tok = EncodecTokenizer.from_pretrained(str(encodec_folder), bandwidth=6.0)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_type"] == "encodec" and config["bandwidth"] == 6.0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = load_audio_tokenizer(str(tmp_path))
    assert isinstance(loaded, EncodecTokenizer) and loaded.bandwidth == 6.0 and loaded.num_codebooks == 2
    wave = np.random.default_rng(2).standard_normal(2000).astype(np.float32) * 0.1
    assert torch.equal(loaded.encode(wave), tok.encode(wave))
