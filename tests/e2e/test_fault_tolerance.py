"""Preemption and crashes: SIGTERM saves and exits 0; kill -9 at random moments never breaks `latest`, and the
resumed run ends exactly where an uninterrupted one does; a damaged checkpoint is named."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.checkpoint import list_checkpoints, verify_checkpoint
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import ROOT, as_flags, fit_small_tokenizer, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def settings(tokenizer, out, **overrides):
    return quick_run(
        tokenizer, out, **{"model_size": "micro", "dropout": 0.1, "max_steps": 16, "save_steps": 1, **overrides}
    )


def start(run: dict, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "recipes/pretrain.py", *as_flags(run), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def newest_step(out) -> int:
    found = list_checkpoints(out)
    return int(found[-1].name.split("-")[-1]) if found else 0


def wait_for(event, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `event()` is true; fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = process.poll() is None
        if event():
            return
        if not running:
            break
        time.sleep(0.02)
    raise AssertionError(f"the event did not happen: {process.poll()=}")


def wait_for_step(out, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has logged step `step` (a metrics row)."""

    def reached() -> bool:
        return (out / "metrics.jsonl").is_file() and any(m.get("step", 0) >= step for m in read_metrics(out))

    wait_for(reached, process, timeout)


def test_sigterm_finishes_the_step_saves_and_exits_0(tokenizer, tmp_path):
    out = tmp_path / "run"
    run = settings(tokenizer, out, save_steps=100, max_steps=200)  # no regular checkpoint would come for a while
    process = start(run)
    wait_for_step(out, 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    (checkpoint,) = list_checkpoints(out)
    step = verify_checkpoint(checkpoint)["global_step"]
    assert 3 <= step < 200 and checkpoint.name == f"checkpoint-{step}"
    assert not (out / "model.safetensors").exists()  # unfinished: no final model pretends to be one


@pytest.mark.long
@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_kill_9_at_random_moments_then_resume_ends_exactly_like_a_straight_run(tokenizer, tmp_path, streaming):
    data = {}
    if streaming:  # 4 parquet shards of 16 rows, 4 a step: 48 steps are 3 epochs of the stream
        from tests.helpers import parquet_shards

        shards = parquet_shards(tmp_path / "shards")
        data = dict(dataset_name=str(shards), streaming=True, per_device_train_batch_size=4, segment_seconds=1.0)
    straight = pretrain(settings(tokenizer, tmp_path / "straight", max_steps=48, **data))
    out = tmp_path / "killed"
    rng = random.Random(0)
    for _ in range(10):
        resume = ["--resume_from_checkpoint", "latest"] if list_checkpoints(out) else ["--overwrite_output_dir", "true"]
        process = start(settings(tokenizer, out, max_steps=48, **data), *resume)
        # the moments come from the run's own progress, not the clock, so a fast or a loaded machine sees the same
        # schedule: 0-2 new checkpoints (one per step; 0: still starting up), then a random part of a step (~20 ms
        # here), which lands some kills in the middle of a checkpoint write
        target = newest_step(out) + rng.randint(0, 2)
        wait_for(lambda target=target: newest_step(out) >= target, process)
        time.sleep(rng.uniform(0.0, 0.02))
        assert process.poll() is None, "the run ended before it was killed"
        process.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of writing a checkpoint
        process.wait()
        for checkpoint in list_checkpoints(out):  # `latest` and every other listed checkpoint stay readable
            verify_checkpoint(checkpoint)
    resume = ["--resume_from_checkpoint", "latest"] if list_checkpoints(out) else ["--overwrite_output_dir", "true"]
    final = start(settings(tokenizer, out, max_steps=48, **data), *resume)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert max_abs_diff(weights(tmp_path / "straight"), weights(out)) < 1e-6
    assert straight.global_step == 48


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_checkpoint_from_before_the_first_evaluation_resumes_through_an_evaluated_save(tokenizer, tmp_path, stop):
    # the checkpoints up to step 24 are taken before any evaluation (their best/ record has no value yet); the
    # resumed run evaluates and saves at step 24, which reads that record
    run = dict(max_steps=30, save_steps=2, eval_steps=24)
    pretrain(settings(tokenizer, tmp_path / "straight", **run))
    out = tmp_path / "stopped"
    process = start(settings(tokenizer, out, **run))
    wait_for(lambda: list_checkpoints(out), process)  # the first checkpoint is there
    process.send_signal(stop)
    assert process.wait(timeout=120) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    state = verify_checkpoint(list_checkpoints(out)[-1])
    assert state["global_step"] < 24 and state["best"] == {"metric": "eval/loss"}  # stopped before the evaluation
    resumed = start(settings(tokenizer, out, **run), "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert max_abs_diff(weights(tmp_path / "straight"), weights(out)) < 1e-6
    assert [m["step"] for m in read_metrics(out) if "eval/loss" in m] == [24, 30]
    assert verify_checkpoint(out / "best")["best"]["step"] in (24, 30)


@pytest.mark.long
def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_run_does_not_block_the_next(tokenizer, tmp_path):
    out = tmp_path / "run"
    first = start(settings(tokenizer, out, max_steps=1000, save_steps=2))
    try:
        wait_for_step(out, 3, first)
        second = start(settings(tokenizer, out, max_steps=1000, save_steps=2), "--resume_from_checkpoint", "latest")
        assert second.wait(timeout=120) == 2
        last = second.stderr.read().strip().splitlines()[-1]
        assert last.startswith(f"pretrain.py: error: output_dir {out} is in use by another run (pid {first.pid} on ")
        assert first.poll() is None  # the first run goes on untouched
    finally:
        first.kill()
        first.wait()
    # kill -9 left the lock file with the dead run's record: the next resume takes it over and continues
    again = start(settings(tokenizer, out, max_steps=6, save_steps=2), "--resume_from_checkpoint", "latest")
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    assert (out / "model.safetensors").is_file()


def test_a_damaged_checkpoint_is_named(tokenizer, tmp_path):
    out = tmp_path / "run"
    pretrain(settings(tokenizer, out, max_steps=2, save_steps=2))
    damaged = out / "checkpoint-2" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint-2/optimizer.bin is truncated"):
        pretrain(settings(tokenizer, out, max_steps=4, save_steps=2, resume_from_checkpoint="latest"))
    (out / "checkpoint-2" / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match=r"optimizer.bin is missing"):
        pretrain(settings(tokenizer, out, max_steps=4, save_steps=2, resume_from_checkpoint="latest"))
