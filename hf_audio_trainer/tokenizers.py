"""Audio tokenizers: mono waveform <-> discrete codes [num_codebooks, frames] for a MusicGen-style audio LM."""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_audio_trainer.errors import ConfigError, MissingError

CONFIG_NAME = "tokenizer_config.json"
MEL_KMEANS_WEIGHTS_NAME = "tokenizer.safetensors"


class AudioTokenizer(ABC):
    """Turns one mono waveform at `sample_rate` into codes [num_codebooks, frames] and back."""

    sample_rate: int
    num_codebooks: int
    codebook_size: int
    hop_length: int

    @property
    def frame_rate(self) -> float:
        """Code frames per second of audio."""
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames that `encode` makes from a clip of `num_samples` samples; 0 means the clip is too short."""
        return num_samples // self.hop_length

    @abstractmethod
    def encode(self, waveform: np.ndarray | torch.Tensor) -> torch.LongTensor:
        """Encode one mono float waveform at `sample_rate` into codes [num_codebooks, frames] on the CPU."""

    def encode_batch(self, waveforms: list[np.ndarray | torch.Tensor]) -> list[torch.LongTensor]:
        """Encode several clips; a clip shorter than one frame gives [num_codebooks, 0] instead of an error."""
        return [self.encode(w) if self.num_frames(len(w)) > 0 else self._empty_codes() for w in waveforms]

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.FloatTensor:
        """Decode codes [num_codebooks, frames] into a mono float waveform [samples] at `sample_rate`."""

    @abstractmethod
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `tokenizer_config.json` (with `tokenizer_type`) and the weights into the folder `path`."""

    def _empty_codes(self) -> torch.LongTensor:
        return torch.zeros(self.num_codebooks, 0, dtype=torch.long)

    def _check_codes(self, codes: torch.Tensor) -> torch.LongTensor:
        codes = torch.as_tensor(codes).long().cpu()
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"expected codes of shape [{self.num_codebooks}, frames], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{codes.min().item()}, {codes.max().item()}]"
            )
        return codes


def _as_mono(waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
    wave = torch.as_tensor(waveform).float()
    if wave.ndim != 1:
        raise ValueError(f"expected one mono waveform of shape [samples], got shape {list(wave.shape)}")
    return wave


def _resolve_file(path_or_id: str | os.PathLike, filename: str) -> str | None:
    """Local path of `filename` in a folder or a Hub repo (cached or downloaded), or None if it has no such file."""
    if os.path.isdir(path_or_id):
        candidate = os.path.join(path_or_id, filename)
        return candidate if os.path.isfile(candidate) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return hf_hub_download(str(path_or_id), filename)
    except (EntryNotFoundError, HFValidationError, OSError):
        # Missing file, a path that is no repo id, no repo, or offline without a cached copy: all mean "not here".
        return None


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_config(path: str | os.PathLike, config: dict) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    with open(Path(path) / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------------------------------
# EnCodec (pretrained neural codec from transformers)
# --------------------------------------------------------------------------------------------------------------------


class EncodecTokenizer(AudioTokenizer):
    """Adapter over transformers' `EncodecModel` (e.g. facebook/encodec_32khz, the MusicGen codec).

    Mono, unchunked models only (24 and 32 kHz). A model with `normalize=True` decodes at unit loudness, because
    the per-clip scale it computes is not part of the codes.
    """

    def __init__(self, model: torch.nn.Module, bandwidth: float | None = None) -> None:
        config = model.config
        if config.audio_channels != 1:
            raise ConfigError(
                f"only mono EnCodec models are supported, this one has audio_channels={config.audio_channels}"
            )
        if config.chunk_length_s is not None:
            # Chunked models (encodec_48khz) return codes per chunk, which breaks the [codebooks, frames] contract.
            raise ConfigError(f"chunked EnCodec models are not supported (chunk_length_s={config.chunk_length_s})")
        if bandwidth is None:
            bandwidth = config.target_bandwidths[0]  # the model's own default in EncodecModel.encode
        if bandwidth not in config.target_bandwidths:
            raise ConfigError(
                f"bandwidth {bandwidth} is not one of this model's target_bandwidths {config.target_bandwidths}"
            )
        self.model = model.eval()
        self.bandwidth = float(bandwidth)
        self.sample_rate = int(config.sampling_rate)
        self.hop_length = int(config.hop_length)
        self.codebook_size = int(config.codebook_size)
        # The quantizer slices its layers with this count, so cap it like the slice does.
        self.num_codebooks = min(model.quantizer.get_num_quantizers_for_bandwidth(bandwidth), config.num_quantizers)
        self._frame_rate = float(config.frame_rate)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, bandwidth: float | None = None, device: str | torch.device = "cpu"
    ) -> EncodecTokenizer:
        """Load an EnCodec model from a folder or Hub id; `bandwidth` defaults to the saved one, else the smallest."""
        from transformers import EncodecModel

        if bandwidth is None:
            config_file = _resolve_file(path_or_id, CONFIG_NAME)
            if config_file is not None:
                bandwidth = _read_json(config_file).get("bandwidth")
        model = EncodecModel.from_pretrained(path_or_id).to(device)
        return cls(model, bandwidth=bandwidth)

    @property
    def frame_rate(self) -> float:
        """Code frames per second, as EnCodec's config rounds it (ceil of sample_rate / hop_length)."""
        return self._frame_rate

    def num_frames(self, num_samples: int) -> int:
        """EnCodec pads the last partial frame, so any non-empty clip gives ceil(num_samples / hop_length) frames."""
        return math.ceil(num_samples / self.hop_length)

    @torch.no_grad()
    def encode(self, waveform: np.ndarray | torch.Tensor) -> torch.LongTensor:
        """Encode one mono waveform into codes [num_codebooks, ceil(samples / hop_length)]."""
        wave = _as_mono(waveform)
        if wave.numel() == 0:
            raise ValueError("cannot encode an empty waveform")
        weight = next(self.model.parameters())
        out = self.model.encode(wave[None, None].to(weight.device, weight.dtype), bandwidth=self.bandwidth)
        return out.audio_codes[0, 0].long().cpu()  # [chunks=1, batch=1, codebooks, frames] -> [codebooks, frames]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.FloatTensor:
        """Decode codes [num_codebooks, frames] into frames * hop_length samples."""
        codes = self._check_codes(codes)
        device = next(self.model.parameters()).device
        # No audio scales: models without `normalize` encode none, and the chunk-free path takes [None].
        audio = self.model.decode(codes[None, None].to(device), [None]).audio_values
        return audio[0, 0].float().cpu()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the EnCodec model (config.json + model.safetensors) and tokenizer_config.json with the bandwidth."""
        self.model.save_pretrained(path)
        _write_config(
            path,
            {
                "tokenizer_type": "encodec",
                "bandwidth": self.bandwidth,
                "sample_rate": self.sample_rate,
                "num_codebooks": self.num_codebooks,
                "codebook_size": self.codebook_size,
                "hop_length": self.hop_length,
            },
        )


# --------------------------------------------------------------------------------------------------------------------
# Mel k-means (weight-free default, fitted on the training audio)
# --------------------------------------------------------------------------------------------------------------------

LOG_MEL_FLOOR = 1e-5  # added to mel power before the log so silence does not dominate the per-bin statistics
MIN_STD = 0.1  # log units (~0.9 dB): bins that barely change get no codebook capacity for inaudible detail
FEATURE_BATCH_SAMPLES = 2**19  # padded samples per batched STFT (~33 s at 16 kHz), ~7 MB per intermediate
FIT_CHUNK = 256  # clips read from the fit iterable at a time
ASSIGN_CHUNK = 16384  # frames per nearest-centroid distance matrix, bounding memory to 16384 * codebook_size floats
KMEANS_SEED_POOL = 16  # k-means++ seeds from 16 * codebook_size sampled frames
KMEANS_TOLERANCE = 1e-2  # Lloyd stops once at most 1% of frames change cluster; later steps barely lower the error


class MelKMeansTokenizer(AudioTokenizer):
    """Residual k-means over normalised log-mel frames, decoded with Griffin-Lim; fitted with `fit`.

    Frame t is the STFT frame centred on sample t * hop_length (zero padding at the edges); torch.stft with
    center=True makes num_samples // hop_length + 1 frames and the last one is dropped, so a clip gives exactly
    num_samples // hop_length frames and decodes to frames * hop_length samples.
    """

    def __init__(
        self,
        codebooks: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 320,
        seed: int = 0,
        griffin_lim_iters: int = 32,
        fit_info: dict | None = None,
    ) -> None:
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be [num_codebooks, codebook_size, n_mels], got {list(codebooks.shape)}")
        self.codebooks = codebooks.float()
        self.mean = mean.float()
        self.std = std.float()
        self.num_codebooks, self.codebook_size, self.n_mels = codebooks.shape
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.seed = seed
        self.griffin_lim_iters = griffin_lim_iters
        self.fit_info = fit_info or {}  # how it was fitted (frames, clips, k-means settings), saved for provenance
        self.window = torch.hann_window(n_fft)
        self.mel_fb = mel_filters(sample_rate, n_fft, self.n_mels)  # [n_fft // 2 + 1, n_mels]
        # A least-squares inverse of the filter bank, clamped at decode time because power cannot be negative.
        self.mel_inverse = torch.linalg.pinv(self.mel_fb)  # [n_mels, n_fft // 2 + 1]

    @classmethod
    def fit(
        cls,
        waveforms: Iterable[np.ndarray],
        sample_rate: int = 16000,
        num_codebooks: int = 4,
        codebook_size: int = 256,
        n_mels: int = 64,
        n_fft: int = 1024,
        hop_length: int = 320,
        seed: int = 0,
        max_fit_frames: int = 20000,
        kmeans_iters: int = 20,
    ) -> MelKMeansTokenizer:
        """Fit per-bin normalisation and residual k-means codebooks on mono clips already at `sample_rate`."""
        if not 0 < hop_length <= n_fft:
            raise ConfigError(f"hop_length must be in (0, n_fft={n_fft}], got {hop_length}")
        if num_codebooks < 1 or codebook_size < 1:
            raise ConfigError(f"num_codebooks and codebook_size must be >= 1, got {num_codebooks} and {codebook_size}")
        if max_fit_frames < codebook_size:
            raise ConfigError(f"max_fit_frames ({max_fit_frames}) must be >= codebook_size ({codebook_size})")
        # An untrained tokenizer only to reuse the feature code; its codebooks are replaced below.
        tok = cls(
            torch.zeros(num_codebooks, codebook_size, n_mels),
            torch.zeros(n_mels),
            torch.ones(n_mels),
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            seed=seed,
        )
        generator = torch.Generator().manual_seed(seed)
        total = torch.zeros(n_mels, dtype=torch.float64)
        total_sq = torch.zeros(n_mels, dtype=torch.float64)
        num_frames, num_clips = 0, 0
        kept, kept_keys = torch.zeros(0, n_mels), torch.zeros(0)
        for chunk in _chunks(waveforms, FIT_CHUNK):
            num_clips += len(chunk)
            frames = torch.cat(tok._log_mel_batch([_as_mono(w) for w in chunk]))
            num_frames += len(frames)
            total += frames.sum(0, dtype=torch.float64)
            total_sq += frames.double().pow(2).sum(0)
            # Bottom-k of random keys is a uniform sample of a stream of unknown length, in bounded memory.
            keys = torch.rand(len(frames), generator=generator)
            kept, kept_keys = torch.cat([kept, frames]), torch.cat([kept_keys, keys])
            if len(kept) > max_fit_frames:
                order = torch.topk(kept_keys, max_fit_frames, largest=False).indices
                kept, kept_keys = kept[order], kept_keys[order]
        if num_frames < codebook_size:
            raise ConfigError(
                f"found only {num_frames} frames ({hop_length / sample_rate * 1000:.0f} ms each) in {num_clips} clips, "
                f"fewer than codebook_size={codebook_size}; give more or longer audio or a smaller codebook_size"
            )
        mean = (total / num_frames).float()
        std = (total_sq / num_frames - (total / num_frames) ** 2).clamp_min(0).sqrt().float().clamp_min(MIN_STD)
        residual = (kept - mean) / std
        codebooks = []
        for _ in range(num_codebooks):
            centroids = _kmeans(residual, codebook_size, kmeans_iters, generator)
            residual = residual - centroids[_assign(residual, centroids)]
            codebooks.append(centroids)
        tok.codebooks, tok.mean, tok.std = torch.stack(codebooks), mean, std
        tok.fit_info = {
            "num_clips": num_clips,
            "num_frames": num_frames,
            "max_fit_frames": max_fit_frames,
            "kmeans_iters": kmeans_iters,
        }
        return tok

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike) -> MelKMeansTokenizer:
        """Load a tokenizer written by `save_pretrained` from a folder or Hub id."""
        config_file = _resolve_file(path_or_id, CONFIG_NAME)
        weights_file = _resolve_file(path_or_id, MEL_KMEANS_WEIGHTS_NAME)
        if config_file is None or weights_file is None:
            raise MissingError(f"{path_or_id} needs both {CONFIG_NAME} and {MEL_KMEANS_WEIGHTS_NAME}")
        config = _read_json(config_file)
        weights = load_file(weights_file)
        return cls(
            weights["codebooks"],
            weights["mean"],
            weights["std"],
            sample_rate=config["sample_rate"],
            n_fft=config["n_fft"],
            hop_length=config["hop_length"],
            seed=config.get("seed", 0),
            griffin_lim_iters=config.get("griffin_lim_iters", 32),
            fit_info=config.get("fit"),
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer_config.json (all hyperparameters) and tokenizer.safetensors (codebooks, mean, std)."""
        _write_config(
            path,
            {
                "tokenizer_type": "mel_kmeans",
                "sample_rate": self.sample_rate,
                "num_codebooks": self.num_codebooks,
                "codebook_size": self.codebook_size,
                "n_mels": self.n_mels,
                "n_fft": self.n_fft,
                "hop_length": self.hop_length,
                "seed": self.seed,
                "griffin_lim_iters": self.griffin_lim_iters,
                "fit": self.fit_info,
            },
        )
        tensors = {"codebooks": self.codebooks, "mean": self.mean, "std": self.std}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(path) / MEL_KMEANS_WEIGHTS_NAME))

    def features(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised log-mel frames [num_frames(len(waveform)), n_mels], the vectors the codebooks quantise."""
        return (self._log_mel_batch([_as_mono(waveform)])[0] - self.mean) / self.std

    def encode(self, waveform: np.ndarray | torch.Tensor) -> torch.LongTensor:
        """Encode one mono waveform into codes [num_codebooks, len(waveform) // hop_length]."""
        wave = _as_mono(waveform)
        if self.num_frames(len(wave)) == 0:
            raise ConfigError(
                f"a clip of {len(wave)} samples is shorter than one frame ({self.hop_length} samples at "
                f"{self.sample_rate} Hz)"
            )
        return self.encode_batch([wave])[0]

    def encode_batch(self, waveforms: list[np.ndarray | torch.Tensor]) -> list[torch.LongTensor]:
        """Encode many clips with batched STFTs and one chunked nearest-centroid search over all their frames."""
        waves = [_as_mono(w) for w in waveforms]
        if not waves:
            return []
        frames = self._log_mel_batch(waves)
        lengths = [len(f) for f in frames]
        residual = (torch.cat(frames) - self.mean) / self.std
        codes = []
        for centroids in self.codebooks:
            index = _assign(residual, centroids)
            residual = residual - centroids[index]
            codes.append(index)
        return [c.contiguous() for c in torch.stack(codes).split(lengths, dim=1)]

    def decode(self, codes: torch.Tensor) -> torch.FloatTensor:
        """Decode codes [num_codebooks, frames] into frames * hop_length samples via Griffin-Lim."""
        codes = self._check_codes(codes)
        num_frames = codes.shape[1]
        if num_frames == 0:
            return torch.zeros(0)
        normalised = sum(self.codebooks[k][codes[k]] for k in range(self.num_codebooks))  # [frames, n_mels]
        mel_power = (normalised * self.std + self.mean).exp() - LOG_MEL_FLOOR
        power = (mel_power @ self.mel_inverse).clamp_min(0)  # [frames, freq]
        magnitude = power.sqrt().T  # [freq, frames]
        # Encoding dropped the STFT frame centred on the clip end; repeat the last one so istft sees all frames.
        magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=1)
        return self._griffin_lim(magnitude, num_frames * self.hop_length)

    def _log_mel_batch(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-mel frames [len // hop_length, n_mels] of each clip, in input order."""
        out = [torch.zeros(0, self.n_mels) for _ in waves]
        # Longest first, batched up to a sample budget: little padding, few ops, moderate allocations.
        order = sorted((i for i, w in enumerate(waves) if self.num_frames(len(w)) > 0), key=lambda i: -len(waves[i]))
        while order:
            size = max(1, FEATURE_BATCH_SAMPLES // len(waves[order[0]]))
            batch, order = order[:size], order[size:]
            # Zero padding at the end is what center=True's constant padding adds anyway, so it changes no kept frame.
            padded = torch.nn.utils.rnn.pad_sequence([waves[i] for i in batch], batch_first=True)
            spec = torch.stft(
                padded, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="constant",
                return_complex=True,
            )  # fmt: skip
            power = torch.view_as_real(spec).square_().sum(-1)  # complex abs() would pay for a sqrt per bin
            log_mel = (power.transpose(1, 2) @ self.mel_fb).add_(LOG_MEL_FLOOR).log_()
            for row, i in enumerate(batch):
                out[i] = log_mel[row, : self.num_frames(len(waves[i]))]
        return out

    def _griffin_lim(self, magnitude: torch.Tensor, length: int) -> torch.Tensor:
        """Fast Griffin-Lim (momentum 0.99, Perraudin et al. 2013) from a seeded random phase: repeatable decodes."""
        generator = torch.Generator().manual_seed(self.seed)
        angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * torch.rand(magnitude.shape, generator=generator))
        stft_args = {"n_fft": self.n_fft, "hop_length": self.hop_length, "window": self.window, "center": True}
        momentum = 0.99 / (1 + 0.99)
        previous = torch.zeros_like(angles)
        for _ in range(self.griffin_lim_iters):
            wave = torch.istft(magnitude * angles, length=length, **stft_args)
            rebuilt = torch.stft(wave, pad_mode="constant", return_complex=True, **stft_args)
            angles = rebuilt - momentum * previous
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        return torch.istft(magnitude * angles, length=length, **stft_args)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, min_frequency: float = 0.0) -> torch.Tensor:
    """Slaney mel filters [n_fft // 2 + 1, n_mels] up to Nyquist (transformers' filter bank, as a float tensor)."""
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=min_frequency,
        max_frequency=sample_rate / 2,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).float()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every row of x, in chunks to bound the distance matrix."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 is the same for every centroid so the argmin skips it.
    norms = centroids.pow(2).sum(1)
    chunks = [torch.addmm(norms, rows, centroids.T, alpha=-2).argmin(1) for rows in x.split(ASSIGN_CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def _kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; empty clusters move to the points worst served by their centroid."""
    # k-means++ is sequential in k, so it runs on a sample of the frames to cost less than the Lloyd steps.
    pool = x[torch.randperm(len(x), generator=generator)[: KMEANS_SEED_POOL * k]]
    centroids = _kmeans_plus_plus(pool, k, generator)
    previous = None
    for _ in range(iters):
        index = _assign(x, centroids)
        if previous is not None and (index != previous).sum() <= KMEANS_TOLERANCE * len(x):
            break
        previous = index
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, index, x)
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids)
        empty = (~filled).nonzero().flatten()
        if len(empty):
            distance = (x - centroids[index]).pow(2).sum(1)
            centroids[empty] = x[torch.topk(distance, len(empty)).indices]
            previous = None  # the re-seeded centroids change the assignment, so keep iterating
    return centroids


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centroid drawn proportional to squared distance."""
    # numpy, not torch: k tiny sequential steps, where the per-op cost of torch's thread pool would dominate.
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
    points = x.numpy()
    norms = (points * points).sum(1)
    chosen = [int(rng.integers(len(points)))]
    distance = np.maximum(norms - 2 * points @ points[chosen[0]] + norms[chosen[0]], 0)
    for _ in range(k - 1):
        total = distance.sum()
        # All points already coincide with a centroid (e.g. exactly repeated frames): any point is as good as another.
        if total > 0:
            chosen.append(min(int(np.searchsorted(np.cumsum(distance), rng.random() * total)), len(points) - 1))
        else:
            chosen.append(int(rng.integers(len(points))))
        np.minimum(distance, np.maximum(norms - 2 * points @ points[chosen[-1]] + norms[chosen[-1]], 0), out=distance)
    return x[chosen].clone()


# --------------------------------------------------------------------------------------------------------------------
# Loading by type
# --------------------------------------------------------------------------------------------------------------------

TOKENIZERS = {"mel_kmeans": MelKMeansTokenizer, "encodec": EncodecTokenizer}


def load_audio_tokenizer(path_or_id: str | os.PathLike) -> AudioTokenizer:
    """Load a saved tokenizer by the `tokenizer_type` in its tokenizer_config.json, or a plain EnCodec model."""
    config_file = _resolve_file(path_or_id, CONFIG_NAME)
    if config_file is not None:
        tokenizer_type = _read_json(config_file).get("tokenizer_type")
        if tokenizer_type not in TOKENIZERS:
            raise ConfigError(
                f"{path_or_id}/{CONFIG_NAME} has tokenizer_type={tokenizer_type!r}; valid types: {sorted(TOKENIZERS)}"
            )
        return TOKENIZERS[tokenizer_type].from_pretrained(path_or_id)
    model_config_file = _resolve_file(path_or_id, "config.json")
    if model_config_file is not None and _read_json(model_config_file).get("model_type") == "encodec":
        return EncodecTokenizer.from_pretrained(path_or_id)
    raise ConfigError(
        f"cannot load an audio tokenizer from {path_or_id!r}: expected a folder or Hub id with a {CONFIG_NAME} "
        f"(tokenizer_type one of {sorted(TOKENIZERS)}) or a transformers EnCodec model (config.json with "
        'model_type "encodec")'
    )
