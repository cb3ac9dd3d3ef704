"""Bad input fails before any training, with a message that names the problem and the fix."""

import numpy as np
import pytest
import soundfile as sf
from datasets import Dataset

from hf_audio_trainer import pretrain
from hf_audio_trainer.data.audio import AudioDecodeError
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, flow_quick_run, quick_run


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tone(seconds: float, sample_rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def audio_folder(root, rates=(16000,), count=12, seconds=1.0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rate = rates[i % len(rates)]
        sf.write(root / f"clip_{i:02d}.wav", tone(seconds, rate, 220.0 + 20 * i), rate)
    return root


def test_missing_dataset_path(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(tmp_path / "does_not_exist"), max_steps=1))


def test_dataset_without_audio_column_lists_columns(tokenizer, tmp_path):
    Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"(?s)audio.*text.*--audio_column"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(tmp_path / "ds"), max_steps=1))


def test_corrupt_file_is_named(tokenizer, tmp_path):
    root = audio_folder(tmp_path / "clips")
    (root / "clip_05.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioDecodeError, match="clip_05.wav"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(root), max_steps=1))
    assert read_metrics(tmp_path / "out") == []  # nothing trained


def test_clip_shorter_than_one_frame(tokenizer, tmp_path):
    root = audio_folder(tmp_path / "clips")
    sf.write(root / "clip_03.wav", tone(0.01, 16000), 16000)  # 160 samples < one 320-sample frame
    with pytest.raises(ValueError, match=r"shorter than one tokenizer frame.*clip_03.wav"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(root), max_steps=1))


def test_nonexistent_resume_checkpoint(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        pretrain(quick_run(tokenizer, tmp_path / "out", resume_from_checkpoint=str(tmp_path / "nope"), max_steps=1))


@pytest.mark.slow
def test_mixed_sample_rates_are_resampled_and_train(tokenizer, tmp_path):
    root = audio_folder(tmp_path / "clips", rates=(8000, 22050, 44100, 16000), count=24)
    result = pretrain(
        quick_run(tokenizer, tmp_path / "out", dataset_name=str(root), max_steps=2, per_device_train_batch_size=4)
    )
    assert result.global_step == 2
    assert np.isfinite(result.metrics["train/loss"])


def test_fp16_on_cpu_is_refused_instead_of_silently_running_fp32(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU.*bf16"):
        pretrain(quick_run(tokenizer, tmp_path / "out", mixed_precision="fp16", max_steps=1))


def test_an_empty_description_is_a_row_for_musicgen_and_the_null_condition_for_flow(tokenizer, tmp_path):
    root = audio_folder(tmp_path / "clips")
    rows = [f"clip_{i:02d}.wav,{'' if i % 2 else f'a tone of {220 + 20 * i} hertz'}" for i in range(12)]
    (root / "metadata.csv").write_text("file_name,description\n" + "\n".join(rows) + "\n")
    # 10 training clips, all in the one step
    settings = dict(dataset_name=str(root), max_steps=1, per_device_train_batch_size=10, validation_split_percentage=20)
    assert pretrain(quick_run(tokenizer, tmp_path / "musicgen", **settings)).global_step == 1
    pretrain(flow_quick_run(tmp_path / "flow", condition_dropout=0.0, warmup_steps=0, **settings))
    [metrics] = [m for m in read_metrics(tmp_path / "flow") if "train/loss" in m]
    # with no dropout, the null conditions are the training rows without a description: 4 to 6 of the 10
    assert 0.4 <= metrics["train/null_condition"] <= 0.6
