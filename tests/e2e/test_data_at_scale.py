"""Data at scale on the real recipe: 3-minute tracks train on windows (drawn from all of each track, resumed
exactly), the tokenized cache is reused by a second run, batches by duration and a sequence-length curriculum run."""

import numpy as np
import pytest
import soundfile as sf

from hf_audio_trainer import pretrain
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.codes import batch_stream
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, max_abs_diff, quick_run, weights

pytestmark = pytest.mark.slow
TRACK_SECONDS = 180
RATE = 16000


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def long_tracks(tmp_path_factory):
    """Six 3-minute tracks: rising chirps over noise, so every part of a track sounds different."""
    folder = tmp_path_factory.mktemp("tracks")
    rng = np.random.default_rng(0)
    t = np.arange(TRACK_SECONDS * RATE) / RATE
    for i in range(6):
        pitch = 110 * 2 ** (i / 6 + 3 * t / TRACK_SECONDS)  # three octaves up over the track
        wave = 0.4 * np.sin(2 * np.pi * np.cumsum(pitch) / RATE) + 0.02 * rng.standard_normal(len(t))
        sf.write(folder / f"track{i}.wav", wave.astype(np.float32), RATE)
    return folder


def test_windows_come_from_all_of_each_track_and_resume_takes_the_same_ones():
    import datasets

    frames, window = TRACK_SECONDS * 50, 30 * 50  # 3-minute tracks at 50 frames/s, 30-s windows
    # codes that are their own frame index, so a window shows where it started
    codes = [[list(range(frames)), list(range(frames))] for _ in range(8)]
    train = datasets.Dataset.from_dict({"codes": codes, "num_frames": [frames] * 8})
    sampler = CurriculumSampler([0.0] * 8, global_batch_size=4, seed=5)

    def starts(start_step, steps):
        stream = batch_stream(train, sampler, 4, lambda ex: ex, start_step, segment_frames=window, seed=5)
        return [[ex["codes"][0][0] for ex in next(stream)] for _ in range(steps)]

    straight = starts(0, 12)  # 6 epochs of 2 steps
    assert all(len(ex) == 4 for ex in straight)
    flat = [s for step in straight for s in step]
    assert max(flat) >= frames - window > 30 * 50  # windows from long after the first 30 s
    assert sorted(set(s // window for s in flat)) == [0, 1, 2, 3, 4, 5]  # from every part of the tracks
    assert starts(5, 7) == straight[5:]  # resuming at step 5 continues the same windows


def test_long_tracks_train_on_windows_resume_exactly_and_reuse_the_cache(tokenizer, long_tracks, tmp_path):
    settings = dict(
        dataset_name=str(long_tracks), validation_split_percentage=20, segment_seconds=2.0, max_steps=4,
        save_steps=2, per_device_train_batch_size=2, model_size="micro", preprocessing_cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    straight = pretrain(quick_run(tokenizer, tmp_path / "straight", **settings))
    assert straight.global_step == 4
    cache = sorted((tmp_path / "c").glob("*/chunk-*.arrow"))
    assert len(cache) == 2  # train and validation, tokenized once
    written = [f.stat().st_mtime_ns for f in cache]
    resumed = pretrain(
        quick_run(
            tokenizer,
            tmp_path / "resumed",
            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"),
            **settings,
        )  # fmt: skip
    )
    assert resumed.global_step == 4
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "c").glob("*/chunk-*.arrow"))] == written  # reused
    # a 2-s window: the model holds 100 frames + BOS + the delay, not 3 minutes
    import json

    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["max_position_embeddings"] == 100 + 2 + 1
    tokens = [m["train/tokens_per_second"] / m["train/samples_per_second"] for m in read_metrics(tmp_path / "straight")
              if "train/tokens_per_second" in m]  # fmt: skip
    assert tokens and all(t == pytest.approx(2 * 100) for t in tokens)  # every clip trains on one 100-frame window


def test_batches_by_duration_and_a_sequence_length_curriculum(tokenizer, tmp_path):
    budget = pretrain(
        quick_run(tokenizer, tmp_path / "budget", max_steps=6, max_tokens_per_batch=2000, model_size="micro")
    )
    assert budget.global_step == 6
    rows = [m for m in read_metrics(tmp_path / "budget") if "train/tokens_per_second" in m]
    per_batch = [m["train/tokens_per_second"] / m["train/samples_per_second"] for m in rows]
    assert rows and all(t <= 2000 for t in per_batch)
    grown = pretrain(
        quick_run(
            tokenizer,
            tmp_path / "curriculum",
            max_steps=8,
            curriculum="linear",
            curriculum_segments=True,
            curriculum_steps=6,
            curriculum_start_fraction=0.25,
            segment_seconds=1.0,
            model_size="micro",
            per_device_train_batch_size=4,
        )  # fmt: skip
    )
    assert grown.global_step == 8
    seconds = [m["train/mean_clip_seconds"] for m in read_metrics(tmp_path / "curriculum") if "train/mean_clip_seconds"
               in m]  # fmt: skip
    # windows grow from 0.25 s to the full 1 s (clips shorter than a window stay whole)
    assert len(seconds) == 8 and seconds[0] <= 0.25 + 1e-9 < 0.9 < seconds[-1] <= 1.0


def test_batches_by_duration_resume_exactly_in_a_later_epoch(tokenizer, tmp_path):
    import json

    settings = dict(max_steps=20, save_steps=17, max_tokens_per_batch=2000, model_size="micro")  # 7 steps an epoch
    straight = pretrain(quick_run(tokenizer, tmp_path / "straight", **settings))
    checkpoint = tmp_path / "straight" / "checkpoint-17"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["sampler"]
    # the epoch the step is in and its first step: a resume packs that epoch's plan, not every one before it
    assert saved["epoch"] == 2 and 0 < saved["epoch_start"] <= 17
    resumed = pretrain(quick_run(tokenizer, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **settings))
    assert straight.global_step == resumed.global_step == 20
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6


def test_streaming_trains_and_resumes_exactly_without_replay(tokenizer, tmp_path):
    from tests.helpers import parquet_shards

    shards = parquet_shards(tmp_path / "shards")
    settings = dict(
        dataset_name=str(shards), streaming=True, max_steps=6, save_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, model_size="micro", segment_seconds=1.0, eval_steps=3,
        preprocessing_cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    straight = pretrain(quick_run(tokenizer, tmp_path / "straight", **settings))
    assert straight.global_step == 6  # 64 rows, 8 a step: 8 steps an epoch, so this stays in epoch 0
    resumed = pretrain(
        quick_run(
            tokenizer,
            tmp_path / "resumed",
            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"),
            **settings,
        )  # fmt: skip
    )
    assert resumed.global_step == 6
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
    assert resumed.metrics["eval/loss"] == pytest.approx(straight.metrics["eval/loss"], abs=1e-6)
    longer = pretrain(quick_run(tokenizer, tmp_path / "two_epochs", **{**settings, "max_steps": 12}))
    assert longer.global_step == 12  # through the end of the epoch into the next


def test_streaming_a_folder_without_shards_names_the_formats(tokenizer, long_tracks, tmp_path):
    from hf_audio_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="parquet"):
        pretrain(quick_run(tokenizer, tmp_path / "out", dataset_name=str(long_tracks), streaming=True, max_steps=1))
    assert read_metrics(tmp_path / "out") == []


def test_a_cold_and_a_warm_cache_start_from_the_same_weights(tokenizer, tmp_path):
    # preprocessing must not draw from the RNG the model is initialised from
    settings = dict(max_steps=1, learning_rate=0.0, model_size="micro", preprocessing_cache_dir=str(tmp_path / "c"))
    pretrain(quick_run(tokenizer, tmp_path / "cold", **settings))
    pretrain(quick_run(tokenizer, tmp_path / "warm", **settings))
    assert max_abs_diff(weights(tmp_path / "cold"), weights(tmp_path / "warm")) == 0.0
