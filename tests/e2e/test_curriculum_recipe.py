"""The curriculum flags on the real recipe: what is trained on, in what order, and the errors."""

import numpy as np
import pytest
import soundfile as sf

from hf_audio_trainer import pretrain
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, quick_run


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def mean_difficulty(output_dir):
    return [m["train/mean_difficulty"] for m in read_metrics(output_dir) if "train/mean_difficulty" in m]


@pytest.mark.slow
def test_linear_curriculum_starts_easy_and_logs_the_batch_difficulty(tokenizer, tmp_path):
    settings = dict(max_steps=6, per_device_train_batch_size=4, curriculum_start_fraction=0.25, curriculum_steps=6)
    paced = pretrain(quick_run(tokenizer, tmp_path / "linear", curriculum="linear", **settings))
    plain = pretrain(quick_run(tokenizer, tmp_path / "none", curriculum="none", **settings))
    assert paced.global_step == plain.global_step == 6
    paced_d, plain_d = mean_difficulty(tmp_path / "linear"), mean_difficulty(tmp_path / "none")
    assert len(paced_d) == len(plain_d) == 6
    assert paced_d[0] < plain_d[0] and paced_d[0] < 0.3  # step 1 drew from the easiest quarter
    assert np.mean(paced_d[:3]) < np.mean(plain_d[:3])


def test_curriculum_without_difficulty_names_both_fixes(tokenizer, tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    t = np.arange(16000) / 16000
    for i in range(8):
        sf.write(root / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t)).astype(np.float32), 16000)
    with pytest.raises(ValueError, match=r"no 'difficulty' column.*--difficulty_method acoustic.*add a 'difficulty'"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(root), curriculum="linear", max_steps=1))


def test_start_fraction_outside_range_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"curriculum_start_fraction=0.0: must be in \(0, 1\]"):
        pretrain(quick_run(tokenizer, tmp_path / "out", curriculum="linear", curriculum_start_fraction=0.0))


@pytest.mark.slow
def test_high_quality_only_and_max_difficulty_select_the_training_rows(tokenizer, tmp_path, capsys):
    from hf_audio_trainer.data.synthetic import make_synthetic_dataset

    train = make_synthetic_dataset(num_clips=64)["train"]
    num_clean = sum(q == "clean" for q in train["quality"])
    num_easy = sum(d <= 0.3 for d in train["difficulty"])
    assert 0 < num_clean < len(train) and 0 < num_easy < len(train)
    capsys.readouterr()
    clean = pretrain(quick_run(tokenizer, tmp_path / "clean", max_steps=2, high_quality_only=True))
    assert f"{num_clean} train / " in capsys.readouterr().out
    easy = pretrain(quick_run(tokenizer, tmp_path / "easy", max_steps=2, max_difficulty=0.3))
    assert f"{num_easy} train / " in capsys.readouterr().out
    assert clean.global_step == easy.global_step == 2
    assert max(mean_difficulty(tmp_path / "easy")) <= 0.3
    with pytest.raises(ValueError, match="no training rows are left"):
        pretrain(quick_run(tokenizer, tmp_path / "none", max_steps=2, max_difficulty=0.0))


@pytest.mark.slow
def test_acoustic_scoring_feeds_the_curriculum_of_a_folder_dataset(tokenizer, tmp_path):
    # clean tones first, noisy ones later: the acoustic score must see the difference
    root = tmp_path / "clips"
    root.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i in range(16):
        noise = 0.3 if i % 2 else 0.0
        wave = 0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t) + noise * rng.standard_normal(len(t))
        sf.write(root / f"c{i:02d}.wav", wave.astype(np.float32), 16000)
    settings = dict(
        dataset_name=str(root),
        difficulty_method="acoustic",
        curriculum="linear",
        max_steps=3,
        per_device_train_batch_size=4,
        curriculum_start_fraction=0.25,
        curriculum_steps=3,
        validation_split_percentage=20,
    )
    result = pretrain(quick_run(tokenizer, tmp_path / "out", **settings))
    assert result.global_step == 3
    first, *_ = mean_difficulty(tmp_path / "out")
    assert first < 0.4  # the first batch came from the clean, easy quarter
