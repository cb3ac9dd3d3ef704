"""Continuous latent spaces for the diffusion family: a diffusers `AutoencoderOobleck` (Stable Audio's VAE) or
`AutoencoderSAME` (Stable Audio 3's) wrapped with the tokenizer interface the preprocessing path reads
(`encode_batch`, `encoder_on`, `fingerprint`), and the
weight-free default: an Oobleck whose weights are set by hand to an orthonormal block DCT, so it is lossless, needs
no training or download, and is still a VAE `StableAudioPipeline` decodes.

Latents are normalised per channel (zero mean, unit variance over the training data, as diffusion expects). The
statistics are folded into the VAE itself (the encoder's last and the decoder's first convolution are affine in
the latent), so the exported VAE encodes to and decodes from the normalised space: the pipeline needs no extra
scaling step, and `latents.json` beside it records the statistics.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch

from hf_audio_trainer.codecs.base import AudioTokenizer
from hf_audio_trainer.errors import ConfigError

# a Snake activation x + sin^2(a x) / b is the identity to float precision with this log-scale b
SNAKE_OFF = 40.0


class LatentSpace(AudioTokenizer):
    """Waveform <-> continuous latents [channels, frames] through a VAE (the posterior's mean, so latents are
    computed once and cached); `decode` turns latents back into audio. A mono VAE reads [samples], a stereo one
    (Stable Audio Open's) [2, samples] (`audio_channels`)."""

    codebook_size = 0  # continuous: no codes

    def __init__(self, vae, name: str = "vae", dct: dict | None = None, what: str = "--vae"):
        from diffusers import AutoencoderOobleck, AutoencoderSAME

        if not isinstance(vae, (AutoencoderOobleck, AutoencoderSAME)):
            raise ConfigError(
                f"{what}: a {type(vae).__name__} is not an AutoencoderOobleck (Stable Audio's VAE) or an "
                "AutoencoderSAME (Stable Audio 3's)"
            )
        kind = type(vae).__name__
        if vae.config.audio_channels not in (1, 2):
            raise ConfigError(
                f"{what} has {vae.config.audio_channels} audio channels; this toolkit trains on mono or stereo audio "
                f"(pass an {kind} with audio_channels 1 or 2)"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.audio_channels = int(vae.config.audio_channels)
        self.name = name
        self.sample_rate = int(vae.config.sampling_rate)
        # SAME: latents are the encoder's output after its soft-norm bottleneck (no posterior), decoded as they are
        self.posterior = isinstance(vae, AutoencoderOobleck)
        self.hop_length = int(vae.hop_length if self.posterior else vae.downsampling_ratio)
        # the latent channels
        self.num_codebooks = int(vae.config.decoder_input_channels if self.posterior else vae.config.latent_dim)
        # the block DCT computes what its VAE does as one matrix product per block (the VAE runs its convolutions at
        # the audio rate): {"mean", "std"} of the normalisation folded into the VAE, if any
        self.dct = dct
        if dct is not None:
            self._d = _dct_matrix(self.hop_length)
            self._mean = torch.as_tensor(dct.get("mean", [0.0] * self.hop_length), dtype=torch.float32)
            self._std = torch.as_tensor(dct.get("std", [1.0] * self.hop_length), dtype=torch.float32)

    def normalized(self, mean: np.ndarray, std: np.ndarray) -> LatentSpace:
        """This space with latents (z - mean) / std, folded into its VAE."""
        dct = None if self.dct is None else {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
        return LatentSpace(fold_statistics(self.vae, mean, std), self.name, dct)

    @property
    def channels(self) -> int:
        return self.num_codebooks

    def encode(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.encode_batch([waveform])[0]

    @torch.no_grad()
    def encode_batch(self, waveforms: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Latents [channels, samples // hop_length] of each clip ([samples], or [audio_channels, samples] for a
        stereo VAE; float32, on the CPU), similar lengths padded together."""
        device = next(self.vae.parameters()).device
        frames = [self.num_frames(w.shape[-1]) for w in waveforms]
        width = max(frames, default=0) * self.hop_length
        if width == 0:
            return [torch.zeros(self.channels, 0) for _ in waveforms]
        if self.dct is not None:
            return [self._dct_encode(w, n) for w, n in zip(waveforms, frames, strict=True)]
        dtype = next(self.vae.parameters()).dtype  # a VAE cast to the run's mixed-precision dtype reads that
        batch = torch.zeros(len(waveforms), self.audio_channels, width, dtype=dtype)
        for i, (w, n) in enumerate(zip(waveforms, frames, strict=True)):
            w = torch.as_tensor(np.asarray(w, dtype=np.float32))[..., : n * self.hop_length]
            batch[i, :, : w.shape[-1]] = w
        encoded = self.vae.encode(batch.to(device))
        latents = (encoded.latent_dist.mode() if self.posterior else encoded.latents).float().cpu()
        return [latents[i, :, :n] for i, n in enumerate(frames)]

    def _dct_encode(self, wave, frames: int) -> torch.Tensor:
        blocks = torch.as_tensor(np.asarray(wave, dtype=np.float32))[: frames * self.hop_length].view(frames, -1)
        return ((blocks.double() @ self._d.double().T).float().T - self._mean[:, None]) / self._std[:, None]

    def encoder_on(self, device: torch.device | str) -> LatentSpace:
        if self.dct is not None or next(self.vae.parameters()).device == torch.device(device):
            return self
        moved = copy.copy(self)
        moved.vae = clone_vae(self.vae).to(device)
        return moved

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A mono waveform (float32, CPU) from latents [channels, frames] (or [batch, channels, frames]); a stereo
        VAE's [2, samples] (or [batch, 2, samples])."""
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        x = torch.as_tensor(latents, dtype=dtype)
        single = x.ndim == 2
        x = x[None] if single else x
        if self.dct is not None:
            z = x.cpu() * self._std[:, None] + self._mean[:, None]  # [B, C, T] -> blocks [B, T, hop]
            audio = (z.transpose(1, 2).double() @ self._d.double()).float().flatten(1)
        else:
            audio = self.vae.decode(x.to(device)).sample.float().cpu()
            audio = audio[:, 0] if self.audio_channels == 1 else audio
        return audio[0] if single else audio

    def _identity(self) -> dict:
        fast = {"dct": repr(self.dct)} if self.dct is not None else {}
        return {"sample_rate": self.sample_rate, "hop_length": self.hop_length, **fast, **self.vae.state_dict()}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    def _empty_codes(self) -> torch.Tensor:
        return torch.zeros(self.channels, 0)


def clone_vae(vae):
    """A copy of a VAE (deepcopy cannot copy weight-normalised convolutions), made without drawing from torch's RNG."""
    with torch.random.fork_rng(devices=[]):
        copied = type(vae).from_config(vae.config)
    copied.load_state_dict(vae.state_dict())
    first = next(vae.parameters())
    if first.dtype != torch.float32:  # a VAE run in the mixed-precision dtype stays in it (diffusers warns on any cast)
        copied = copied.to(first.dtype)
    return copied.to(first.device).eval().requires_grad_(False)


def load_latent_space(vae: str | None, sample_rate: int, hop_length: int, stats: dict | None = None) -> LatentSpace:
    """The VAE of --vae (an AutoencoderOobleck folder or Hub id, or a pipeline's `vae/`), else the weight-free block
    DCT at `sample_rate` with `hop_length`-sample frames. `stats`: a flow export's latents.json, which says whether
    its VAE is the block DCT (then computed as one), with the statistics folded into it."""
    if vae is None:
        return LatentSpace(block_dct_vae(sample_rate, hop_length), name=f"block-dct-{hop_length}", dct={})
    from diffusers import AutoencoderOobleck

    model, failure = None, None
    for subfolder in ("vae", None):  # a pipeline's VAE, or a VAE of its own
        try:
            model = AutoencoderOobleck.from_pretrained(vae, subfolder=subfolder)
            break
        except (OSError, ValueError) as err:
            failure = failure or err
    if model is None:
        raise ConfigError(
            f"--vae {vae}: could not load an AutoencoderOobleck ({str(failure).splitlines()[0]}); pass a folder or Hub "
            "id of one (e.g. a stabilityai/stable-audio-open-1.0 download, subfolder vae/), or drop --vae for the "
            "weight-free block DCT"
        )
    name = (stats or {}).get("vae", str(vae))
    dct = {"mean": stats["mean"], "std": stats["std"]} if name.startswith("block-dct") and "mean" in stats else None
    return LatentSpace(model, name=name, dct=dct)


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D [n, n]: coefficients = D @ block, block = D.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def _set_conv(conv: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give a weight-normalised convolution exactly `weight` (g = |v| per output slice; zero slices get g = 0)."""
    dims = tuple(range(1, weight.ndim))
    norm = weight.norm(dim=dims, keepdim=True)
    conv.weight_v.data.copy_(torch.where(norm > 0, weight, torch.ones_like(weight)))
    v_norm = conv.weight_v.data.norm(dim=dims, keepdim=True)
    conv.weight_g.data.copy_(torch.where(norm > 0, v_norm, torch.zeros_like(norm)))
    if conv.bias is not None:
        conv.bias.data.copy_(bias if bias is not None else torch.zeros_like(conv.bias))


def _weight(conv: torch.nn.Module) -> torch.Tensor:
    """A weight-normalised convolution's weight from g and v (its `.weight` is only refreshed by a forward pass)."""
    return torch._weight_norm(conv.weight_v, conv.weight_g, 0).detach().clone()


def block_dct_vae(sample_rate: int, hop_length: int):
    """An AutoencoderOobleck that is an orthonormal DCT of each `hop_length`-sample block (one downsampling stage;
    Snake activations switched off, residual units zeroed): `hop_length` latent channels, lossless, weight-free."""
    from diffusers import AutoencoderOobleck

    if hop_length % 2 or hop_length < 2:
        raise ConfigError(f"latent_hop_length={hop_length}: must be an even number of samples >= 2")
    n = hop_length
    with torch.random.fork_rng(devices=[]):  # every weight is set below: draw nothing from training's stream
        vae = AutoencoderOobleck(
            encoder_hidden_size=2 * n, downsampling_ratios=[n], channel_multiples=[1], decoder_channels=n,
            decoder_input_channels=n, audio_channels=1, sampling_rate=sample_rate,
        )  # fmt: skip
    d, pad = _dct_matrix(n), math.ceil(n / 2)
    with torch.no_grad():
        for module in vae.modules():
            if type(module).__name__ == "Snake1d":
                module.alpha.zero_()
                module.beta.fill_(SNAKE_OFF)
            if type(module).__name__ == "OobleckResidualUnit":  # its branch adds zero: the unit is the identity
                _set_conv(module.conv2, torch.zeros_like(module.conv2.weight), None)
        enc, dec = vae.encoder, vae.decoder
        # encoder: the waveform into channel 0, then block n = samples [n*hop, (n+1)*hop) as channels, then the DCT
        w = torch.zeros_like(enc.conv1.weight)
        w[0, 0, 3] = 1.0
        _set_conv(enc.conv1, w)
        block = enc.block[0].conv1
        w = torch.zeros_like(block.weight)
        for c in range(n):
            w[c, 0, pad + c] = 1.0
        _set_conv(block, w)
        w = torch.zeros_like(enc.conv2.weight)  # [2n (mean, scale), 2n (the first n hold the block), 3]
        w[:n, :n, 1] = d
        _set_conv(enc.conv2, w)
        # decoder: latents through unchanged, then the inverse DCT spread back over each block's samples
        w = torch.zeros_like(dec.conv1.weight)
        w[:, :, 3] = torch.eye(n)
        _set_conv(dec.conv1, w)
        up = dec.block[0].conv_t1  # ConvTranspose1d weight [in, out, 2 * hop]
        w = torch.zeros_like(up.weight)
        w[:, 0, pad : pad + n] = d
        _set_conv(up, w)
        w = torch.zeros_like(dec.conv2.weight)
        w[0, 0, 3] = 1.0
        _set_conv(dec.conv2, w)
    return vae.eval()


def latent_statistics(latents, max_rows: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of [channels][frames] latents (of the first `max_rows` rows: enough for a stable
    estimate, and the same on every rank)."""
    total = sq = count = 0.0
    for row in latents[:max_rows]:
        x = np.asarray(row, dtype=np.float64)
        total, sq, count = total + x.sum(1), sq + (x * x).sum(1), count + x.shape[1]
    if not count:
        raise ConfigError("no latent frames to compute the latent statistics from: the training clips are empty")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-5 * max(float(std.max()), 1e-12)).astype(np.float32)


def fold_statistics(vae, mean: np.ndarray, std: np.ndarray):
    """A copy of `vae` whose latents are (z - mean) / std: the encoder's last convolution (its mean half) and the
    decoder's first one absorb the affine map, so encode and decode stay inverse to each other."""
    vae = clone_vae(vae)
    m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    n = len(m)
    with torch.no_grad():
        enc = vae.encoder.conv2
        w, b = _weight(enc), enc.bias.detach().clone()
        w[:n] /= s[:, None, None]
        b[:n] = (b[:n] - m) / s
        _set_conv(enc, w, b)
        dec = vae.decoder.conv1  # y = W z' + b with z' = s z + m  ->  W diag(s), b + W m
        w, b = _weight(dec), dec.bias.detach().clone()
        b = b + torch.einsum("oik,i->o", w, m)
        _set_conv(dec, w * s[None, :, None], b)
    return vae
