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


def wait_for_step(out, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").is_file() and any(m.get("step", 0) >= step for m in read_metrics(out)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}: {process.poll()=}")


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


def test_kill_9_at_random_moments_then_resume_ends_exactly_like_a_straight_run(tokenizer, tmp_path):
    straight = pretrain(settings(tokenizer, tmp_path / "straight"))
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        resume = ["--resume_from_checkpoint", "latest"] if list_checkpoints(out) else ["--overwrite_output_dir", "true"]
        process = start(settings(tokenizer, out), *resume)
        time.sleep(rng.uniform(4.0, 9.0))  # start-up takes ~4 s; then a step and a checkpoint every ~0.1 s
        if process.poll() is not None:
            break  # it finished before the kill
        process.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of writing a checkpoint
        process.wait()
        kills += 1
        for checkpoint in list_checkpoints(out):  # `latest` and every other listed checkpoint stay readable
            verify_checkpoint(checkpoint)
    assert kills >= 5, "the run finished too fast to be killed often enough"
    resume = ["--resume_from_checkpoint", "latest"] if list_checkpoints(out) else ["--overwrite_output_dir", "true"]
    final = start(settings(tokenizer, out), *resume)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert max_abs_diff(weights(tmp_path / "straight"), weights(out)) < 1e-6
    assert straight.global_step == 16


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
