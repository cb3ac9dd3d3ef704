"""CLAP score: how well generated audio matches its text prompt, the cosine similarity of transformers `ClapModel`'s
text and audio embeddings (as in AudioLDM's and TangoFlux's evaluations), from a folder or Hub id."""

from __future__ import annotations

import os

import numpy as np
import torch

from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.metrics.embedders import ClapEmbedder


class ClapScorer:
    """`scorer(waves, sample_rate, texts)` -> per-clip cosine similarity in [-1, 1] between each clip and its text.

    Audio goes through `ClapEmbedder` (fixed windows, so a clip always gets the same vector); text through the
    model's tokenizer (`AutoTokenizer` of the same folder) and `get_text_features`.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer

        try:
            self.audio = ClapEmbedder.from_pretrained(str(model_name_or_path), device=str(device))
            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"could not load a CLAP model with its tokenizer and feature extractor from {model_name_or_path!r} "
                f"(--clap_model: a folder or cached Hub id such as laion/clap-htsat-unfused): {err}"
            ) from err
        self.model, self.name = self.audio.model, str(model_name_or_path)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        inputs = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.audio.device)
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns a model output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def __call__(self, waves: list[np.ndarray], sample_rate: int, texts: list[str]) -> np.ndarray:
        if len(waves) != len(texts):
            raise ValueError(f"{len(waves)} clips but {len(texts)} texts")
        audio = self.audio.embed(waves, sample_rate)
        audio = audio / np.linalg.norm(audio, axis=1, keepdims=True).clip(min=1e-12)
        return (audio * self.text_embeddings(texts)).sum(1)
