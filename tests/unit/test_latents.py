"""The flow family's latent spaces: the weight-free block DCT is a lossless AutoencoderOobleck, and folding the
latent statistics into a VAE gives normalised latents that still decode to the same audio."""

import numpy as np
import pytest
import torch

from hf_audio_trainer.codecs.latents import latent_statistics, load_latent_space
from hf_audio_trainer.errors import ConfigError


def waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    return [tone, rng.standard_normal(9000).astype(np.float32)]


def test_block_dct_is_a_lossless_oobleck_whose_fast_path_matches_its_convolutions():
    space = load_latent_space(None, 16000, 64)
    x = waves()
    z = space.encode_batch(x)
    assert [tuple(c.shape) for c in z] == [(64, 250), (64, 140)]  # 9000 // 64 frames, the tail cut
    through_vae = space.vae.encode(torch.from_numpy(x[0])[None, None]).latent_dist.mode()[0]
    assert torch.allclose(z[0], through_vae, atol=1e-5)
    assert torch.allclose(space.decode(z[0]), torch.from_numpy(x[0]), atol=1e-5)
    assert torch.allclose(space.vae.decode(z[0][None]).sample[0, 0], torch.from_numpy(x[0]), atol=1e-5)
    # an orthonormal transform: the latents keep the waveform's energy
    assert float((z[0] ** 2).sum()) == pytest.approx(float((x[0] ** 2).sum()), rel=1e-4)


def test_folded_statistics_normalise_and_keep_encode_and_decode_inverse():
    raw = load_latent_space(None, 16000, 32)
    z = [c.numpy() for c in raw.encode_batch(waves(1))]
    mean, std = latent_statistics(z)
    expected = np.concatenate(z, axis=1)
    assert np.allclose(mean, expected.mean(1), atol=1e-5) and np.allclose(std, expected.std(1), rtol=1e-4)
    space = raw.normalized(mean, std)
    x = waves(1)
    normalised = torch.cat(space.encode_batch(x), dim=1)
    assert torch.allclose(normalised.mean(1), torch.zeros(32), atol=1e-4)
    assert torch.allclose(normalised.std(1, unbiased=False), torch.ones(32), rtol=1e-3)
    # the folded VAE (what the export carries) agrees with the fast path, both ways
    one = space.encode_batch([x[0]])[0]
    assert torch.allclose(space.vae.encode(torch.from_numpy(x[0])[None, None]).latent_dist.mode()[0], one, atol=1e-4)
    assert torch.allclose(space.vae.decode(one[None]).sample[0, 0], torch.from_numpy(x[0]), atol=1e-4)
    assert space.fingerprint() != raw.fingerprint()


def test_bad_latent_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="even number"):
        load_latent_space(None, 16000, 63)
    with pytest.raises(ConfigError, match="could not load an AutoencoderOobleck"):
        load_latent_space(str(tmp_path), 16000, 64)
