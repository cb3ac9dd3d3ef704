"""One run per output folder: a second run is refused naming the holder; a killed holder leaves no lock behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hf_audio_trainer.errors import LockedError
from hf_audio_trainer.lock import LOCK_FILE, OutputLock

# takes the lock, says so, and releases it when its stdin closes
HOLD = (
    "import sys; from hf_audio_trainer.lock import OutputLock; lock = OutputLock(sys.argv[1]); lock.acquire(); "
    "print('held', flush=True); sys.stdin.read(); lock.release()"
)


def hold_in_another_process(folder) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"  # an event, not a sleep
    return process


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(LockedError) as refused:
            OutputLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, since " in message
        assert "another --output_dir" in message
    finally:
        holder.stdin.close()  # it reads to EOF, then exits and releases
        holder.wait(timeout=30)
    lock = OutputLock(tmp_path)
    assert lock.acquire() is None  # released cleanly: no stale record to take over
    lock.release()


def test_a_lock_left_by_kill_9_does_not_block_the_next_run(tmp_path):
    holder = hold_in_another_process(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # its record is still there
    lock = OutputLock(tmp_path)
    note = lock.acquire()
    assert note is not None and f"pid {holder.pid}" in note and "killed?" in note
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: the file stays, its record goes


def test_the_same_process_cannot_take_it_twice_and_release_frees_it(tmp_path):
    first = OutputLock(tmp_path)
    first.acquire()
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        OutputLock(tmp_path).acquire()  # a second stage in one notebook while the first still runs
    first.release()
    second = OutputLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_a_live_holder_whose_lock_is_not_held_is_refused(tmp_path):
    # what a filesystem that ignores flock looks like: the record names a live process, yet the lock is free
    record = {"pid": os.getppid(), "host": socket.gethostname(), "since": "then", "time": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(LockedError, match="the filesystem may not support locks"):
        OutputLock(tmp_path).acquire()


def test_the_record_holds_no_command_line_a_token_could_be_on(tmp_path):
    secret = "hf_secretTOKEN0123456789abcdef"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "--hub_token", secret, f"--hub_token={secret}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "held"
        record = (tmp_path / LOCK_FILE).read_bytes()
        assert json.loads(record)["pid"] == process.pid
        assert secret.encode() not in record and b"hub_token" not in record
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the event did not happen"
        time.sleep(0.01)


def test_the_holder_refreshes_its_record_while_it_runs(tmp_path):
    lock = OutputLock(tmp_path, refresh_every=0.05)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())
        wait_until(lambda: json.loads((tmp_path / LOCK_FILE).read_text())["refreshed"] > first["refreshed"])
        now = json.loads((tmp_path / LOCK_FILE).read_text())
        assert now["pid"] == os.getpid() and now["since"] == first["since"]  # the same holder, a newer time
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no refresh after the release brings the record back


def remote_record(age: float) -> dict:
    # another machine's run: its pid means nothing here, and where flock works only within a node, holding the
    # lock here proves nothing about it
    refreshed = time.time() - age
    return {"pid": 4242, "host": "another-node", "since": "then", "time": refreshed - 3600, "refreshed": refreshed}


def test_a_fresh_record_of_another_machine_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(remote_record(age=5)))
    with pytest.raises(LockedError, match=r"pid 4242 on host another-node.*refreshed \d+ s ago") as refused:
        OutputLock(tmp_path).acquire()
    assert "another --output_dir" in str(refused.value)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 4242  # its record untouched


def test_a_record_of_another_machine_is_taken_over_once_it_is_no_longer_refreshed(tmp_path):
    lock = OutputLock(tmp_path)
    (tmp_path / LOCK_FILE).write_text(json.dumps(remote_record(age=lock.stale_after + 5)))
    note = lock.acquire()
    try:
        assert note is not None and "pid 4242 on host another-node" in note
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
