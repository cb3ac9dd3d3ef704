"""The CLAP score: cosine similarity of a clip's CLAP audio embedding and its text's, from a tiny random ClapModel."""

import numpy as np
import pytest
import torch

from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.metrics.clap import ClapScorer
from tests.helpers import tiny_clap


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClapScorer(tiny_clap(tmp_path_factory.mktemp("clap")))


def test_the_score_is_the_cosine_of_the_text_and_audio_embeddings(scorer):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000).astype(np.float32) * 0.1, np.sin(np.arange(24000) / 5).astype(np.float32)]
    texts = ["white noise", "a sine tone, clean"]
    scores = scorer(waves, 16000, texts)
    # by hand: the model's own text features and the embedder's audio vectors, each scaled to unit length
    model, tokenizer = scorer.model, scorer.tokenizer
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text = getattr(text, "pooler_output", text).numpy()
    audio = scorer.audio.embed(waves, 16000)
    expected = [a @ t / np.linalg.norm(a) / np.linalg.norm(t) for a, t in zip(audio, text, strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert np.all(np.abs(scores) <= 1 + 1e-6)
    # each clip is scored against its own text: swapping the texts swaps the pairing
    swapped = scorer(waves, 16000, texts[::-1])
    assert not np.allclose(swapped, scores)
    np.testing.assert_allclose(scorer(waves[::-1], 16000, texts[::-1]), scores[::-1], rtol=1e-5)


def test_a_folder_without_clap_is_refused_with_the_flag_name(tmp_path):
    with pytest.raises(ConfigError, match="--clap_model"):
        ClapScorer(tmp_path)
    with pytest.raises(ValueError, match="2 clips but 1 texts"):
        ClapScorer.__call__(object.__new__(ClapScorer), [np.zeros(10)] * 2, 16000, ["x"])
