"""DPO under two real processes: the update and TRL's metrics equal one process with the whole batch, and so does
the evaluation of one validation pair, which leaves the second process without a pair of its own."""

import json

import pytest

from hf_audio_trainer import align, pretrain
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import as_flags, fit_small_tokenizer, launch, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_processes_align_like_one_with_the_whole_batch(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    pretrain(quick_run(tokenizer, tmp_path / "policy", max_steps=4))

    def settings(out, **overrides):
        run = quick_run(None, out, model_name_or_path=str(tmp_path / "policy"), synthetic_num_pairs=10, max_steps=3,
                        save_steps=3, eval_steps=3, learning_rate=1e-3, **overrides)  # fmt: skip
        del run["tokenizer"], run["synthetic_num_clips"]
        return run

    ddp = settings(tmp_path / "ddp", per_device_train_batch_size=2)
    done = launch(
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", "29534", "recipes/align.py", *as_flags(ddp)],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.MULTI_CPU"
    single = align(settings(tmp_path / "single", per_device_train_batch_size=4))
    assert max_abs_diff(weights(tmp_path / "ddp"), weights(tmp_path / "single")) < 1e-5
    ddp_metrics = [m for m in read_metrics(tmp_path / "ddp") if "train/loss" in m][-1]
    for name in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"):
        assert ddp_metrics[name] == pytest.approx(single.metrics[name], rel=1e-4, abs=1e-5), name
    # 10 pairs hold out 1: the second process reduces a padding pair's DPO metrics (all zero), not just the loss
    evaluated = {k: v for m in read_metrics(tmp_path / "ddp") for k, v in m.items() if k.startswith("eval/")}
    assert {"eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "eval/logps/chosen"} <= evaluated.keys()
    for name, value in evaluated.items():
        assert value == pytest.approx(single.metrics[name], rel=1e-4, abs=1e-5), name
