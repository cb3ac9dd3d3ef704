"""Audio for a stereo VAE: decoded without downmixing, each channel resampled, a mono clip duplicated, another channel
count refused; encoded in windows with the silence after a short clip (its own length recorded), cached apart from the
mono caches, whose keys did not change."""

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from accelerate import Accelerator
from datasets import Dataset

from hf_audio_trainer.codecs.latents import LatentSpace
from hf_audio_trainer.data import preprocess
from hf_audio_trainer.data.audio import AudioDecodeError, channel_count, decode_audio
from hf_audio_trainer.data.preprocess import encode_dataset


def stereo(seconds: float = 0.5, rate: int = 48000) -> np.ndarray:
    """[samples, 2]: a 440 Hz sine left, 660 Hz right."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1).astype(np.float32)


def test_a_stereo_file_keeps_its_channels_each_resampled(tmp_path):
    wave = stereo()
    sf.write(tmp_path / "s.wav", wave, 48000, subtype="FLOAT")
    out = decode_audio(str(tmp_path / "s.wav"), 44100, channels=2)
    assert out.shape == (2, 22050) and out.dtype == np.float32
    for c in range(2):  # each channel is soxr's resampling of that channel alone
        np.testing.assert_allclose(out[c], soxr.resample(wave[:, c], 48000, 44100), atol=1e-5)
    assert channel_count(str(tmp_path / "s.wav")) == 2
    # channels=None and 1 are the mono decoding, averaging the channels as before
    np.testing.assert_array_equal(
        decode_audio(str(tmp_path / "s.wav"), 44100), decode_audio(str(tmp_path / "s.wav"), 44100, channels=1)
    )


def test_a_mono_clip_is_duplicated_and_arrays_of_either_layout_read_alike(tmp_path):
    wave = stereo()[:, 0]
    out = decode_audio({"array": wave, "sampling_rate": 44100}, 44100, channels=2)
    assert out.shape == (2, len(wave)) and np.array_equal(out[0], wave) and np.array_equal(out[1], wave)
    two = stereo(rate=44100)
    a = decode_audio({"array": two, "sampling_rate": 44100}, 44100, channels=2)  # [samples, channels]
    b = decode_audio({"array": two.T, "sampling_rate": 44100}, 44100, channels=2)  # [channels, samples]
    assert np.array_equal(a, b) and np.array_equal(a, two.T)
    assert channel_count({"array": two.T, "sampling_rate": 44100}) == 2


def test_a_channel_count_the_vae_cannot_read_is_refused_by_name(tmp_path):
    sf.write(tmp_path / "quad.wav", np.zeros((1000, 4), np.float32), 44100)
    with pytest.raises(
        AudioDecodeError, match=r"quad.wav \(train row 3\) has 4 channels and the model reads 2; downmix"
    ):
        decode_audio(str(tmp_path / "quad.wav"), 44100, where="train row 3", channels=2)


def tiny_stereo_vae():
    from diffusers import AutoencoderOobleck

    torch.manual_seed(0)
    return AutoencoderOobleck(
        encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 1], decoder_channels=4,
        decoder_input_channels=4, audio_channels=2, sampling_rate=8000,
    ).eval()  # fmt: skip


def test_a_stereo_latent_space_encodes_both_channels_and_decodes_stereo():
    space = LatentSpace(tiny_stereo_vae())
    left, right = np.random.default_rng(0).standard_normal((2, 80)).astype(np.float32)
    latents = space.encode(np.stack([left, right]))
    assert latents.shape == (4, 10)  # hop 8
    with torch.no_grad():
        expected = space.vae.encode(torch.from_numpy(np.stack([left, right]))[None]).latent_dist.mode()[0]
    torch.testing.assert_close(latents, expected)
    swapped = space.encode(np.stack([right, left]))
    assert not torch.allclose(latents, swapped)  # the channels are read, not averaged
    assert space.decode(latents).shape == (2, 80) and space.decode(latents[None]).shape == (1, 2, 80)


def test_windows_encode_the_silence_after_a_short_clip_and_record_its_length(tmp_path):
    space = LatentSpace(tiny_stereo_vae())
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (36, 80, 200)]  # mono, to a stereo VAE
    dataset = Dataset.from_dict({"audio": [{"array": c, "sampling_rate": 8000} for c in clips]})
    acc = Accelerator(cpu=True)
    coded = encode_dataset(dataset, space, acc, cache_dir=tmp_path, values="latents", channels=2, pad_to_samples=80)
    assert coded["num_samples"] == [36, 80, 200] and coded["num_frames"] == [4, 10, 25]  # their own lengths
    assert [len(x[0]) for x in coded["latents"]] == [10, 10, 25]  # a short clip: a whole window, silence included
    # the silence is encoded with the clip (not zero latents appended): its latents are the VAE's of the padded
    # audio, duplicated to both channels (encoded in one batch, as the cache encodes similar lengths together)
    padded = [np.stack([np.pad(c, (0, max(80 - len(c), 0)))] * 2) for c in clips]
    expected = space.encode_batch(padded)
    for row in range(3):
        np.testing.assert_allclose(np.asarray(coded[row]["latents"]), expected[row].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(coded[0]["latents"])[:, 5:], 0, atol=1e-3)  # the silence has latents of its own
    # another layout is another cache; the mono one's key is what it always was
    keys = {p.name for p in tmp_path.iterdir()}
    encode_dataset(dataset, space, acc, cache_dir=tmp_path, values="latents", channels=2)
    assert len({p.name for p in tmp_path.iterdir()} - keys) == 1


def test_the_mono_cache_key_hashes_what_it_always_did(tmp_path, monkeypatch):
    """A mono encoder's cache key is the fingerprint of the same eleven values as before stereo (the existing caches
    stay valid); the stereo layout adds one."""
    from hf_audio_trainer.codecs.latents import load_latent_space

    hashed = []
    real = preprocess.fingerprint
    monkeypatch.setattr(preprocess, "fingerprint", lambda *parts: hashed.append(parts) or real(*parts))
    dataset = Dataset.from_dict({"audio": [{"array": np.zeros(64, np.float32), "sampling_rate": 8000}] * 2})
    encode_dataset(
        dataset, load_latent_space(None, 8000, 8), Accelerator(cpu=True), cache_dir=tmp_path, values="latents"
    )
    assert len(hashed[0]) == 11 and hashed[0][0] == "latents" and hashed[0][-1] == "cpu"
    encode_dataset(dataset, LatentSpace(tiny_stereo_vae()), Accelerator(cpu=True), cache_dir=tmp_path,
                   values="latents", channels=2)  # fmt: skip
    assert len(hashed[1]) == 12 and hashed[1][-1] == {"channels": 2, "pad": None}
