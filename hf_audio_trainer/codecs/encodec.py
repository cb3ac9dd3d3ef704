"""EnCodec (a pretrained neural codec from transformers, e.g. the MusicGen codec) as a discrete tokenizer."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from hf_audio_trainer.codecs.base import CONFIG_NAME, AudioTokenizer, _as_mono, _read_json, _resolve_file, _write_config
from hf_audio_trainer.errors import ConfigError


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
        from hf_audio_trainer.models import load_pretrained

        model = load_pretrained(EncodecModel, str(path_or_id), "an EncodecModel").to(device)
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
    def encode_batch(self, waveforms: list[np.ndarray | torch.Tensor]) -> list[torch.LongTensor]:
        """Encode clips in one padded forward pass (callers batch clips of similar length: less padding).

        A clip's codes match its own `encode` except in its last frames, which see the zero padding after it through
        the encoder's non-causal convolutions where its own pass sees the convolutions' edge padding.
        """
        waves = [_as_mono(w) for w in waveforms]
        out = [self._empty_codes() for _ in waves]
        kept = [i for i, w in enumerate(waves) if w.numel()]
        if not kept:
            return out
        weight = next(self.model.parameters())
        padded = torch.nn.utils.rnn.pad_sequence([waves[i] for i in kept], batch_first=True)
        mask = torch.zeros(padded.shape, dtype=torch.bool)
        for row, i in enumerate(kept):
            mask[row, : len(waves[i])] = True
        codes = (
            self.model.encode(
                padded[:, None].to(weight.device, weight.dtype),
                mask[:, None].to(weight.device),
                bandwidth=self.bandwidth,
            )
            .audio_codes[0]
            .long()
            .cpu()
        )  # [chunks=1, batch, codebooks, frames] -> [batch, codebooks, frames]
        for row, i in enumerate(kept):
            out[i] = codes[row, :, : self.num_frames(len(waves[i]))].contiguous()
        return out

    def encoder_on(self, device: torch.device | str) -> EncodecTokenizer:
        if next(self.model.parameters()).device == torch.device(device):
            return self
        import copy

        return EncodecTokenizer(copy.deepcopy(self.model).to(device), self.bandwidth)

    def _identity(self) -> dict:
        return {"bandwidth": self.bandwidth, **self.model.state_dict()}

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
