import signal

import datasets
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.difficulty import (
    DIFFICULTY_METHODS,
    acoustic_feature_table,
    acoustic_features,
    percentile_rank,
    score_difficulty,
)
from hf_audio_trainer.families.musicgen import MUSICGEN, build_decoder, clip_losses, lm_loss

SR = 16000
# Spearman correlation with the generator's difficulty, measured: 0.922 over the 2,000 default clips and over these 200.
SPEARMAN_200 = 0.90


def synthetic(num_clips: int) -> datasets.Dataset:
    splits = make_synthetic_dataset(num_clips, seed=0)
    return datasets.concatenate_datasets([splits["train"], splits["validation"]])


def clips(*waves: np.ndarray) -> datasets.Dataset:
    audio = [{"array": w.astype(np.float32), "sampling_rate": SR} for w in waves]
    return datasets.Dataset.from_dict({"audio": audio})


def tone(midis: list[int], seconds: float = 2.0, onsets_per_second: float = 0.0) -> np.ndarray:
    """Harmonic tones (1/k partials) at the given MIDI notes, restruck `onsets_per_second` times a second."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * k * t) / k for m in midis for k in (1, 2, 3))
    if onsets_per_second:
        x = x * np.exp(-8 * (t % (1 / onsets_per_second)))  # a decaying strike at every onset
    return 0.5 * x / np.abs(x).max()


def test_column_method_rescales_to_exactly_zero_one_in_order():
    ds = datasets.Dataset.from_dict({"score": [3, 1, 2, 5], "difficulty": [9.0, 9.0, 9.0, 9.0]})
    out = score_difficulty(ds, "column", column="score")
    assert out.features["difficulty"] == datasets.Value("float32")
    np.testing.assert_array_equal(out["difficulty"], np.array([0.5, 0.0, 0.25, 1.0], dtype=np.float32))
    assert out["score"] == [3, 1, 2, 5]  # the source column is kept; "difficulty" is replaced


def test_column_method_reads_and_overwrites_difficulty():
    out = score_difficulty(datasets.Dataset.from_dict({"difficulty": [0.2, 0.6, 0.4]}), "column")
    np.testing.assert_allclose(out["difficulty"], [0.0, 1.0, 0.5], atol=1e-6)


def test_missing_column_names_it_lists_columns_and_suggests_acoustic():
    ds = datasets.Dataset.from_dict({"audio_path": ["a.wav"], "label": [1]})
    with pytest.raises(ValueError, match="'hardness'") as err:
        score_difficulty(ds, "column", column="hardness")
    assert "audio_path" in str(err.value) and "--difficulty_method acoustic" in str(err.value)


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown difficulty method 'loss'") as err:
        score_difficulty(datasets.Dataset.from_dict({"difficulty": [1.0]}), "loss")
    assert all(name in str(err.value) for name in DIFFICULTY_METHODS)


def test_nan_scores_name_the_rows():
    ds = datasets.Dataset.from_dict({"difficulty": [0.1, float("nan"), 0.3, float("inf")]})
    with pytest.raises(ValueError, match=r"rows \[1, 3\].*re-encode or remove"):
        score_difficulty(ds, "column")


def test_all_equal_scores_warn_and_give_zeros():
    ds = datasets.Dataset.from_dict({"difficulty": [0.7, 0.7, 0.7]})
    with pytest.warns(UserWarning, match="plain shuffle"):
        out = score_difficulty(ds, "column")
    assert out["difficulty"] == [0.0, 0.0, 0.0]


def test_percentile_rank_ignores_scale_and_shares_ties():
    np.testing.assert_allclose(percentile_rank(np.array([10.0, -3.0, 1e6, 10.0])), [0.5, 0.0, 1.0, 0.5])


def test_noise_makes_a_clip_harder():
    sine = tone([69])
    noisy = sine + 0.2 * np.random.default_rng(0).standard_normal(len(sine))
    raw = acoustic_features([sine, noisy])
    assert raw["noisiness"][0] < -60 < raw["noisiness"][1]  # dB of noise floor relative to the peak
    assert score_difficulty(clips(sine, noisy), "acoustic")["difficulty"] == [0.0, 1.0]


def test_a_chord_is_harder_than_a_single_note():
    note, chord = tone([60]), tone([60, 64, 67, 71])  # C and Cmaj7, both peaking at 0.5
    raw = acoustic_features([note, chord])
    assert raw["polyphony"].tolist() == [1.0, 4.0]
    assert score_difficulty(clips(note, chord), "acoustic")["difficulty"] == [0.0, 1.0]


def test_more_onsets_per_second_is_harder():
    slow, fast = tone([64], onsets_per_second=1.0), tone([64], onsets_per_second=5.0)
    raw = acoustic_features([slow, fast])
    np.testing.assert_allclose(raw["onset_rate"], [1.0, 5.0], atol=0.5)
    assert score_difficulty(clips(slow, fast), "acoustic")["difficulty"] == [0.0, 1.0]


def test_silent_and_empty_clips_have_finite_features_and_no_notes():
    raw = acoustic_features([np.zeros(SR, dtype=np.float32), np.zeros(0, dtype=np.float32)])
    assert all(np.isfinite(values).all() for values in raw.values())
    assert raw["onset_rate"].tolist() == [0.0, 0.0] and raw["polyphony"].tolist() == [0.0, 0.0]


def test_num_proc_workers_match_one_process_and_do_not_hang():
    ds = clips(tone([60]), tone([60, 64, 67]), tone([62], onsets_per_second=3.0), tone([65, 69]))
    one = score_difficulty(ds, "acoustic")["difficulty"]  # this process has now run torch ops before forking
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("num_proc workers hung"))
    signal.alarm(120)
    try:
        assert score_difficulty(ds, "acoustic", num_proc=2)["difficulty"] == one
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_acoustic_score_ranks_synthetic_clips_like_the_generator(tmp_path):
    synthetic(200).save_to_disk(str(tmp_path))  # saved, so the second scoring reuses the features
    ds = datasets.load_from_disk(str(tmp_path))
    scores = np.asarray(score_difficulty(ds, "acoustic")["difficulty"])
    assert scores.min() == 0.0 and scores.max() == 1.0
    assert spearmanr(scores, ds["difficulty"])[0] > SPEARMAN_200
    # Weights pick the features: polyphony alone ranks like the generator's polyphony.
    only_polyphony = score_difficulty(ds, "acoustic", weights={"noisiness": 0, "onset_rate": 0, "polyphony": 1})
    assert spearmanr(only_polyphony["difficulty"], ds["polyphony"])[0] > 0.9


def test_unknown_weight_is_an_error():
    with pytest.raises(ValueError, match="unknown: \\['loudness'\\]"):
        score_difficulty(clips(tone([60])), "acoustic", weights={"loudness": 1.0})


def test_scoring_a_saved_dataset_twice_reuses_the_cache(tmp_path):
    synthetic(12).save_to_disk(str(tmp_path / "data"))
    first = score_difficulty(datasets.load_from_disk(str(tmp_path / "data")), "acoustic")
    cache = sorted((tmp_path / "data").glob("cache-*.arrow"))
    assert len(cache) == 1  # the features; the rescaled column is added in memory
    written = cache[0].stat().st_mtime_ns
    second = score_difficulty(datasets.load_from_disk(str(tmp_path / "data")), "acoustic")
    assert sorted((tmp_path / "data").glob("cache-*.arrow")) == cache
    assert cache[0].stat().st_mtime_ns == written  # read back, not recomputed
    assert first["difficulty"] == second["difficulty"]
    table = acoustic_feature_table(datasets.load_from_disk(str(tmp_path / "data")))
    assert [f["filename"] for f in table.cache_files] == [str(cache[0])]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A folder laid out like a run's output: a tiny model and, in tokenizer/, the tokenizer it reads."""
    folder = tmp_path_factory.mktemp("run")
    waves = [np.asarray(a["array"], dtype=np.float32) for a in synthetic(8)["audio"]]
    tokenizer = MelKMeansTokenizer.fit(waves, num_codebooks=2, codebook_size=16, n_mels=16, kmeans_iters=5)
    torch.manual_seed(0)
    build_decoder(None, "micro", 2, 16, max_positions=160).save_pretrained(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_model_loss_matches_a_hand_computed_per_clip_loss(run_folder):
    from transformers import MusicgenForCausalLM

    ds = synthetic(8)
    model = MusicgenForCausalLM.from_pretrained(run_folder).eval()
    tokenizer = MelKMeansTokenizer.from_pretrained(run_folder / "tokenizer")
    waves = [np.asarray(a["array"], dtype=np.float32) for a in ds["audio"]]
    losses = clip_losses(model, tokenizer, waves)  # one padded batch of clips of different lengths

    one = 3
    collate = CodesCollator(2, model.config.pad_token_id, model.config.bos_token_id, tokenizer.frame_rate)
    batch = collate([{"codes": tokenizer.encode(waves[one]).numpy()}])
    with torch.no_grad():
        total, _ = lm_loss(model, batch)
    assert abs(losses[one] - total.item() / batch["num_items"]) < 1e-5

    scorer = MUSICGEN.load_clip_scorer  # the family's: the stage passes it the same way
    out = score_difficulty(ds, "model_loss", model_name_or_path=str(run_folder), batch_size=4, clip_scorer=scorer)
    scores = np.asarray(out["difficulty"])
    assert scores.min() == 0.0 and scores.max() == 1.0
    np.testing.assert_allclose(scores, (losses - losses.min()) / (losses.max() - losses.min()), atol=1e-5)


def test_model_loss_needs_a_run_folder(tmp_path):
    ds = clips(tone([60]))
    with pytest.raises(ValueError, match="model_name_or_path"):
        score_difficulty(ds, "model_loss", clip_scorer=MUSICGEN.load_clip_scorer)
    with pytest.raises(ValueError, match="no tokenizer/ folder"):
        score_difficulty(ds, "model_loss", model_name_or_path=str(tmp_path), clip_scorer=MUSICGEN.load_clip_scorer)


def test_weights_only_apply_to_acoustic():
    with pytest.raises(ValueError, match="weights only apply"):
        score_difficulty(datasets.Dataset.from_dict({"difficulty": [1.0, 2.0]}), "column", weights={"duration": 1})
