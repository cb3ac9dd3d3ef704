"""The faults of a long real run (issue 24): torn metrics lines, Hub uploads slower than saves or cut short by a stop,
a token on the command line, a lock on a filesystem shared by several machines."""

import json
import os
import signal
import subprocess
import sys

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.checkpoint import list_checkpoints
from hf_audio_trainer.lock import LOCK_FILE
from hf_audio_trainer.trackers import METRICS_FILE, read_metrics
from tests.e2e.test_fault_tolerance import wait_for
from tests.helpers import ROOT, as_flags, fit_small_tokenizer, quick_run
from tests.unit.test_hub import REPO, TOKEN, hub  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def settings(tokenizer, out, **overrides):
    return quick_run(tokenizer, out, **{"model_size": "micro", "max_steps": 4, "save_steps": 2, **overrides})


def test_a_torn_metrics_line_neither_blocks_the_resume_nor_the_summary(tokenizer, tmp_path):
    out = tmp_path / "run"
    pretrain(settings(tokenizer, out))
    with open(out / METRICS_FILE, "ab") as f:  # the disk filled up in the middle of a line, then the node died
        f.write(b'{"step": 5, "time": 1.0, "train/lo' + b"\0" * 64)
    result = pretrain(settings(tokenizer, out, max_steps=6, resume_from_checkpoint="latest"))
    assert result.global_step == 6
    lines = (out / METRICS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # the resume cleaned the file
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def start(run: dict, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """recipes/pretrain.py as a user starts it (flags on the command line), offline unless `env` says otherwise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "recipes/pretrain.py", *as_flags(run), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def files_holding(folder, secret: bytes) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and secret in path.read_bytes():
                found.append(str(path.relative_to(folder)))
        except FileNotFoundError:  # rotated away while we looked
            pass
    return found


def test_no_file_of_a_running_run_holds_the_token(tokenizer, tmp_path, hub):  # noqa: F811
    hub.gate.clear()  # uploads hang, so their staging folders are in the output folder while it is searched
    out = tmp_path / "run"
    pushing = dict(push_to_hub=True, hub_model_id=REPO, hub_strategy="checkpoint", report_to="tensorboard")
    run = settings(tokenizer, out, max_steps=1000, save_steps=2, **pushing)
    process = start(run, "--hub_token", TOKEN, env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"})
    try:
        wait_for(lambda: hub.upload_started.is_set() and list_checkpoints(out), process)
        names = {p.name for p in out.iterdir()}
        assert LOCK_FILE in names and any(n.startswith(".tmp-") for n in names)  # the lock and a staging folder
        assert files_holding(out, TOKEN.encode()) == []
    finally:
        hub.gate.set()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
