"""Two real processes (gloo on CPU): preprocessing splits the rows between ranks and both read the same codes;
batches by duration give every rank the same number of micro-batches and the update of one process."""

import json

import pytest

from hf_audio_trainer import pretrain
from tests.helpers import as_flags, fit_small_tokenizer, launch, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROWS = 40  # in 5 chunks of 8: rank 0 encodes 0, 2, 4 (24 rows), rank 1 encodes 1, 3 (16 rows)


@pytest.mark.parametrize("shared", [True, False])
def test_each_rank_encodes_its_share_and_all_read_the_same_codes(tmp_path, shared):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", str(29573 + shared)]
    script = ["tests/distributed/preprocess_on_ranks.py", str(tokenizer), str(tmp_path), str(int(shared))]
    done = launch([*config, *script], env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["rows"] == ranks[1]["rows"] == ROWS and ranks[0]["hash"] == ranks[1]["hash"]
    if shared:
        assert [r["clips"] for r in ranks] == [24, 16]  # its own chunks only: the work is split
    else:
        assert [r["clips"] for r in ranks] == [ROWS, ROWS]  # its share, then what its filesystem lacks


def test_two_processes_by_duration_equal_one_process(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    common = dict(max_steps=4, save_steps=4, max_tokens_per_batch=1200, model_size="micro")
    ddp = quick_run(tokenizer, tmp_path / "ddp", gradient_accumulation_steps=2, **common)
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29571"]
    done = launch([*config, "recipes/pretrain.py", *as_flags(ddp)], env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.MULTI_CPU"
    assert "4 micro-batches of <= 1200 tokens" in done.stdout
    # one process, 4 micro-batches a step: the same plan, so the same clips in every step, and the loss is weighted
    # by target tokens, so micro-batches of different sizes still give one process's update
    pretrain(quick_run(tokenizer, tmp_path / "single", gradient_accumulation_steps=4, **common))
    diff = max_abs_diff(weights(tmp_path / "ddp"), weights(tmp_path / "single"))
    assert diff < 1e-5, diff


def test_two_processes_stream_their_own_shards_and_resume_exactly(tmp_path):
    from tests.helpers import parquet_shards

    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    shards = parquet_shards(tmp_path / "shards")  # 4 train shards of 16 rows: 2 per process, 8 steps of 4 an epoch
    common = dict(
        dataset_name=str(shards), streaming=True, max_steps=10, save_steps=5, per_device_train_batch_size=4,
        model_size="micro", segment_seconds=1.0, dropout=0.1,
    )  # fmt: skip
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29577"]
    env = {"ACCELERATE_USE_CPU": "true"}
    straight = quick_run(tokenizer, tmp_path / "straight", **common)  # past the end of epoch 0
    done = launch([*config, "recipes/pretrain.py", *as_flags(straight)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streaming 4 shards (64 rows), 32 per process" in done.stdout
    middle = str(tmp_path / "straight" / "checkpoint-5")
    resumed = quick_run(tokenizer, tmp_path / "resumed", resume_from_checkpoint=middle, **common)
    done = launch([*config, "recipes/pretrain.py", *as_flags(resumed)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "resumed" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
