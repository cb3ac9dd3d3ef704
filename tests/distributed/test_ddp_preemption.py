"""Preemption under two real processes: a SIGTERM reaching any rank (or all of them, as SLURM sends it) stops both
after the same step with one complete checkpoint, and the job exits 0."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from hf_audio_trainer.checkpoint import list_checkpoints, verify_checkpoint
from hf_audio_trainer.lock import LOCK_FILE
from tests.e2e.test_fault_tolerance import settings, wait_for_step
from tests.helpers import ROOT, as_flags, fit_small_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.fault]


def start_ddp(run: dict, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", str(port)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "recipes/pretrain.py", *as_flags(run)]
    # a session of its own, so "signal the whole job" below reaches exactly the launcher and its workers
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and "recipes/pretrain.py" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no worker with RANK={rank} under the launcher")


@pytest.mark.parametrize("target", ["rank 1 only", "the whole job"])
def test_sigterm_stops_both_ranks_after_the_same_step_with_a_checkpoint(tmp_path, target):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "run"
    run = settings(tokenizer, out, save_steps=1000, max_steps=1000, per_device_train_batch_size=2)
    launcher = start_ddp(run, port=29551 if target == "rank 1 only" else 29553)
    try:
        wait_for_step(out, 3, launcher)
        # one lock for the output folder, held by the main process of the two
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == worker(launcher, 0).pid
        if target == "rank 1 only":
            worker(launcher, 1).send_signal(signal.SIGTERM)  # rank 0 hears nothing: it learns through the reduce
        else:
            os.killpg(launcher.pid, signal.SIGTERM)  # SLURM / Kubernetes: every process of the job at once
        returncode = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    # signalled itself, the launcher ends with an error after its workers have stopped: 128 + SIGTERM from a recent
    # accelerate (1.16 exits with the signal's status), 1 from older ones (torchrun's SignalException escaped)
    expected = {0} if target == "rank 1 only" else {1, 128 + signal.SIGTERM}
    assert returncode in expected, launcher.stderr.read()[-3000:]
    (checkpoint,) = list_checkpoints(out)
    state = verify_checkpoint(checkpoint)
    assert 3 <= state["global_step"] < 1000 and state["num_processes"] == 2
    assert state["distributed_type"] == "DistributedType.MULTI_CPU"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(state["files"])  # both ranks saved the same step
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == state["global_step"]
    assert not (out / "model.safetensors").exists()
