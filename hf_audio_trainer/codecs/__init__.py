"""Audio codecs: discrete tokenizers (mel k-means, EnCodec) that turn audio into codes and back; continuous latent
encoders will live here too."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from hf_audio_trainer.codecs.base import CONFIG_NAME, AudioTokenizer, _read_json, _resolve_file
from hf_audio_trainer.codecs.encodec import EncodecTokenizer
from hf_audio_trainer.codecs.mel_kmeans import MEL_KMEANS_WEIGHTS_NAME, MelKMeansTokenizer, mel_filters
from hf_audio_trainer.errors import ConfigError, check

__all__ = [
    "CONFIG_NAME",
    "MEL_KMEANS_WEIGHTS_NAME",
    "TOKENIZERS",
    "AudioTokenizer",
    "EncodecTokenizer",
    "MelKMeansTokenizer",
    "TokenizerConfig",
    "load_audio_tokenizer",
    "mel_filters",
]

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


@dataclass
class TokenizerConfig:
    """The discrete audio tokenizer whose codes a language-model family trains on."""

    stages: ClassVar[tuple[str, ...]] = ("pretrain", "finetune")  # align reads the policy's own (its data section)
    shapes_model: ClassVar[bool] = True  # the codebooks set the model's embeddings and heads

    tokenizer: str | None = field(
        default=None,
        metadata={"help": "A saved audio tokenizer (folder or Hub id, mel_kmeans or EnCodec); unset: fit mel k-means."},
    )
    num_codebooks: int = field(default=4, metadata={"help": "Codebooks of a newly fitted tokenizer."})
    codebook_size: int = field(default=256, metadata={"help": "Entries per codebook of a newly fitted tokenizer."})

    def __post_init__(self) -> None:
        check(self.num_codebooks >= 1, f"num_codebooks={self.num_codebooks}: must be >= 1")
        check(2 <= self.codebook_size <= 32768, f"codebook_size={self.codebook_size}: must be in [2, 32768]")
