"""The weight-free default tokenizer: residual k-means over log-mel frames, decoded back with Griffin-Lim."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_audio_trainer.codecs.base import CONFIG_NAME, AudioTokenizer, _as_mono, _read_json, _resolve_file, _write_config
from hf_audio_trainer.errors import ConfigError, MissingError

MEL_KMEANS_WEIGHTS_NAME = "tokenizer.safetensors"
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
        waves = [_as_mono(w).to(self.mean.device) for w in waveforms]
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
        return [c.cpu().contiguous() for c in torch.stack(codes).split(lengths, dim=1)]

    def encoder_on(self, device: torch.device | str) -> MelKMeansTokenizer:
        if self.mean.device == torch.device(device):
            return self
        import copy

        moved = copy.copy(self)
        for name in ("codebooks", "mean", "std", "window", "mel_fb"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def _identity(self) -> dict:
        settings = ("sample_rate", "n_fft", "hop_length", "n_mels")
        return {"codebooks": self.codebooks, "mean": self.mean, "std": self.std} | {
            k: getattr(self, k) for k in settings
        }

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
        out = [torch.zeros(0, self.n_mels, device=self.mean.device) for _ in waves]
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
