"""The faults of a long real run (issue 24): torn metrics lines, Hub uploads slower than saves or cut short by a stop,
a token on the command line, a lock on a filesystem shared by several machines."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from huggingface_hub import constants

from hf_audio_trainer import pretrain
from hf_audio_trainer.checkpoint import list_checkpoints
from hf_audio_trainer.errors import RemoteError
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


class Output:
    """A process's output lines as they come, so a test can wait for one."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []

        def read() -> None:
            for line in process.stdout:
                self.lines.append(line)

        threading.Thread(target=read, daemon=True).start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))


def start(run: dict, *extra: str, hub) -> tuple[subprocess.Popen, Output]:  # noqa: F811
    """recipes/pretrain.py as a user starts it (flags and --hub_token on the command line), pushing to the fake Hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": hub.endpoint}
    cmd = [sys.executable, "recipes/pretrain.py", *as_flags(run), "--hub_token", TOKEN, *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, Output(process)


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
    process, output = start(run, hub=hub)
    try:
        wait_for(lambda: hub.upload_started.is_set() and list_checkpoints(out), process)
        names = {p.name for p in out.iterdir()}
        assert LOCK_FILE in names and any(n.startswith(".tmp-") for n in names)  # the lock and a staging folder
        assert files_holding(out, TOKEN.encode()) == []
    finally:
        hub.gate.set()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    assert files_holding(out, TOKEN.encode()) == [] and not output.has(TOKEN)  # nor after, nor in what it printed


def test_a_failed_final_push_ends_the_run_with_an_error(tokenizer, tmp_path, hub, monkeypatch):  # noqa: F811
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    hub.fail_commits, hub.fail_status = float("inf"), 403  # the token may create the repo but not write to it
    out = tmp_path / "run"
    pushing = dict(push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN, hub_strategy="end")
    with pytest.raises(RemoteError) as failed:  # a UserError: the recipe ends it with one line and exit status 2
        pretrain(settings(tokenizer, out, **pushing))
    message = str(failed.value)
    assert "push 'End of training' to me/audio-model failed after 4 tries" in message and "403" in message
    assert f"the final model in {out} is complete: upload it with `hf upload {REPO} {out} " in message
    assert TOKEN not in message and (out / "model.safetensors").is_file()


def stopped_while_uploading(tokenizer, out, hub, *extra: str) -> tuple[subprocess.Popen, Output]:  # noqa: F811
    """A pushing run, SIGTERM-ed while the Hub hangs on its first upload."""
    hub.gate.clear()
    hub.hang_limit = 600
    pushing = dict(push_to_hub=True, hub_model_id=REPO, hub_strategy="every_save")
    run = settings(tokenizer, out, max_steps=1000, save_steps=2, **pushing)
    process, output = start(run, *extra, hub=hub)
    wait_for(lambda: hub.upload_started.is_set(), process)
    process.send_signal(signal.SIGTERM)
    return process, output


def test_a_stopped_run_waits_for_its_uploads_while_it_holds_the_folder(tokenizer, tmp_path, hub):  # noqa: F811
    out = tmp_path / "run"
    process, output = stopped_while_uploading(tokenizer, out, hub)
    try:
        wait_for(lambda: output.has(f"waiting up to 60 s for 2 upload(s) to {REPO}"), process)
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == process.pid  # no next run can start meanwhile
    finally:
        hub.gate.set()
    assert process.wait(timeout=300) == 0, "".join(output.lines)[-3000:]
    stopped = int(list_checkpoints(out)[-1].name.split("-")[-1])
    # the upload in flight, then the stopped step's, which replaced those of the saves between them
    assert [c["message"] for c in hub.commits] == [
        "Training in progress, step 2",
        f"Training in progress, step {stopped}",
    ]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # every snapshot removed
    assert (out / LOCK_FILE).read_text().strip() == ""


def test_a_stopped_run_waits_no_longer_than_hub_stop_timeout(tokenizer, tmp_path, hub):  # noqa: F811
    out = tmp_path / "run"
    process, output = stopped_while_uploading(tokenizer, out, hub, "--hub_stop_timeout", "0.5")
    try:
        assert process.wait(timeout=300) == 0, "".join(output.lines)[-3000:]  # while the Hub still hangs
        assert not hub.gate.is_set() and hub.commits == []
    finally:
        hub.gate.set()
    text = "".join(output.lines)
    assert "push 'Training in progress, step 2' to me/audio-model did not finish within 0.5 s; it was dropped" in text
    # the snapshot of the abandoned upload stays; its `.tmp-` name is what the next run's start-of-run sweep removes
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(name == LOCK_FILE or name.startswith(".tmp-") for name in hidden), hidden
