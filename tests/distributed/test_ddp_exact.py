"""Two real processes (gloo on CPU): the global batch is split by rank and the update equals one big batch."""

import json

import pytest

from hf_audio_trainer import pretrain
from tests.helpers import as_flags, fit_small_tokenizer, launch, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_processes_2x2_equal_one_process_8x1_with_a_curriculum(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    # with a curriculum and length grouping on: the global order is built first and then split by rank, so two
    # processes still train on exactly what one process would
    common = dict(max_steps=4, save_steps=4, curriculum="root", curriculum_steps=3, group_by_length=True)
    ddp = quick_run(tokenizer, tmp_path / "ddp", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    # the shipped config with ACCELERATE_USE_CPU gives two gloo processes (`--cpu --num_processes 2` would start one)
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29533"]
    done = launch([*config, "recipes/pretrain.py", *as_flags(ddp)], env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert state["distributed_type"] == "DistributedType.MULTI_CPU"
    assert state["global_batch_size"] == 8
    assert (tmp_path / "ddp" / "checkpoint-4" / "random_states_1.pkl").is_file()  # rank 1's RNG saved too

    single = quick_run(tokenizer, tmp_path / "single", per_device_train_batch_size=8, **common)
    pretrain(single)
    diff = max_abs_diff(weights(tmp_path / "ddp"), weights(tmp_path / "single"))
    assert diff < 1e-5, diff


def test_two_process_resume_from_step_3_equals_6_straight(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    common = dict(max_steps=6, save_steps=3, dropout=0.1, per_device_train_batch_size=2)  # dropout: RNG per rank
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29535"]
    env = {"ACCELERATE_USE_CPU": "true"}
    straight = quick_run(tokenizer, tmp_path / "straight", **common)
    done = launch([*config, "recipes/pretrain.py", *as_flags(straight)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # the second run restarts from the first's step-3 checkpoint (model, optimizer, schedule, both ranks' RNG)
    middle = str(tmp_path / "straight" / "checkpoint-3")
    second = quick_run(tokenizer, tmp_path / "resumed", resume_from_checkpoint=middle, **common)
    done = launch([*config, "recipes/pretrain.py", *as_flags(second)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.MULTI_CPU"
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
