"""What every audio codec of the toolkit is: a discrete tokenizer (mono waveform <-> codes [num_codebooks, frames]),
saved as a folder with `tokenizer_config.json`, and loaded back by its `tokenizer_type`."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

CONFIG_NAME = "tokenizer_config.json"


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

    def encoder_on(self, device: torch.device | str) -> AudioTokenizer:
        """A tokenizer that encodes on `device` (codes still come back on the CPU); this one where it is already."""
        return self

    def fingerprint(self) -> str:
        """A hash of what decides the codes (weights and settings): two tokenizers with one encode alike."""
        import hashlib

        if getattr(self, "_fingerprint", None) is not None:  # weights do not change after loading: hash them once
            return self._fingerprint
        digest = hashlib.sha256(type(self).__name__.encode())
        for name, value in sorted(self._identity().items()):
            digest.update(name.encode())
            if isinstance(value, torch.Tensor):
                digest.update(tensor_bytes(value))
            else:
                digest.update(repr(value).encode())
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _identity(self) -> dict:
        """Name -> tensor or plain value of everything the codes depend on (for `fingerprint`)."""
        raise NotImplementedError

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


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's memory as bytes, for hashing: numpy's for the dtypes it has, reinterpreted for bfloat16 (which
    numpy lacks: a frozen part run in the mixed-precision dtype)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy().tobytes()


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
