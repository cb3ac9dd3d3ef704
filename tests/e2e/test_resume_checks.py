"""A resume continues the checkpoint's run or stops with one line: the seed, the training data and a stream's shard
list must be the checkpoint's (unless --allow_data_change accepts the change), and a stage's default starting model
must be there (only a name the user gave may be a Hub id)."""

import os
import shutil
import subprocess
import sys

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import ROOT, fit_small_tokenizer, parquet_shards, quick_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_a_resume_with_another_seed_or_other_data_is_refused_by_name(tokenizer, tmp_path):
    out = tmp_path / "run"
    pretrain(quick_run(tokenizer, out, max_steps=4, save_steps=2, model_size="micro"))
    again = dict(max_steps=6, save_steps=2, model_size="micro", resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match=r"was trained on another data order: --seed 1 here, 0 in the checkpoint"):
        pretrain(quick_run(tokenizer, out, seed=1, **again))
    with pytest.raises(ConfigError, match=r"the training data \(\d+ rows here, \d+ in the checkpoint\), so resuming"):
        pretrain(quick_run(tokenizer, out, synthetic_num_clips=80, **again))  # files added to the dataset
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # nothing ran
    # the same data and seed resume as before; another data set when it is accepted on purpose
    assert pretrain(quick_run(tokenizer, out, **again)).global_step == 6
    more = {**again, "max_steps": 8, "synthetic_num_clips": 80, "allow_data_change": True}
    assert pretrain(quick_run(tokenizer, out, **more)).global_step == 8


def test_a_resume_at_a_lower_learning_rate_continues_the_schedule_at_it(tokenizer, tmp_path):
    # the usual answer to a loss spike: back to an earlier checkpoint, a lower rate; the restored optimizer and
    # schedule must not keep the checkpoint's rate
    out = tmp_path / "run"
    settings = dict(max_steps=4, save_steps=2, model_size="micro", lr_scheduler_type="linear", warmup_steps=0,
                    learning_rate=2e-3)  # fmt: skip
    pretrain(quick_run(tokenizer, out, **settings))
    before = {m["step"]: m["train/learning_rate"] for m in read_metrics(out) if "train/learning_rate" in m}
    pretrain(quick_run(tokenizer, out, **{**settings, "learning_rate": 5e-4},
                       resume_from_checkpoint=str(out / "checkpoint-2")))  # fmt: skip
    after = {m["step"]: m["train/learning_rate"] for m in read_metrics(out) if "train/learning_rate" in m}
    assert after[2] == before[2]  # the log up to the checkpoint is the first run's
    for step in (3, 4):  # the same point of the same linear decay, a quarter as high
        assert after[step] == pytest.approx(before[step] / 4, rel=1e-6), (before, after)
    assert after[3] > after[4]


def test_a_stream_whose_shard_list_changed_is_refused_by_name(tokenizer, tmp_path):
    shards = parquet_shards(tmp_path / "shards", train_shards=2)
    settings = dict(dataset_name=str(shards), streaming=True, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                    model_size="micro", segment_seconds=1.0, preprocessing_cache_dir=str(tmp_path / "c"))  # fmt: skip
    out = tmp_path / "run"
    pretrain(quick_run(tokenizer, out, **settings))
    shutil.copy(shards / "train-00001-of-00002.parquet", shards / "train-00002-of-00002.parquet")
    with pytest.raises(ConfigError, match=r"the shard list \(1 added, 0 gone\)"):
        pretrain(quick_run(tokenizer, out, **{**settings, "max_steps": 4, "resume_from_checkpoint": "latest"}))


def test_a_default_starting_model_that_is_not_there_is_one_line_naming_it(tmp_path):
    # launched from another folder, finetune's default outputs/pretrain is not there: said so, never looked up on
    # the Hub as a repo id
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "finetune.py"), "--max_steps", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: finetune starts from a pretrained model: the default --model_name_or_path "
        "outputs/pretrain is not a folder here; run recipes/pretrain.py first, or pass --model_name_or_path (a "
        "pretrain output folder or Hub id)"
    )
    assert not (tmp_path / "outputs" / "finetune" / "run_config.json").exists()  # refused before the run started
