"""One run per output folder: an exclusive lock held for the whole run.

The lock is `fcntl.flock` on `OUTPUT_DIR/.lock`, so the kernel drops it the moment its holder dies: a run killed with
`kill -9` leaves no lock that blocks the next resume. The file also records who holds it (pid, host, since when), for
the message a second run gets; a record left behind by a killed run is recognised as stale and taken over with a
note. Under several processes or machines only the main process of the run takes it (one lock per output folder).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil

from hf_audio_trainer.errors import LockedError

LOCK_FILE = ".lock"


class OutputLock:
    """`acquire()` the output folder or raise `LockedError` naming the holder; `release()` (also on any exit)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale record of a killed run was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record must survive
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise LockedError(
                f"output_dir {self.path.parent} is in use by another run ({describe(holder)}); wait for it to end, "
                "stop it, or pass another --output_dir"
            ) from None
        previous = read_holder(fd)
        note = None
        if previous:
            same_host = previous.get("host") == socket.gethostname()
            if same_host and previous.get("pid") != os.getpid() and holder_alive(previous):
                # its holder lives, yet the lock was free: this filesystem does not honour flock (some network
                # filesystems); refusing is the only safe answer
                os.close(fd)
                raise LockedError(
                    f"output_dir {self.path.parent} is recorded as in use by a live run ({describe(previous)}) but "
                    "its lock is not held: the filesystem may not support locks. Stop that run or use another "
                    "--output_dir"
                )
            note = f"took over the lock of a run that ended without releasing it ({describe(previous)}; killed?)"
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "time": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return note

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: removing it would let two runs lock two files)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def read_holder(fd: int) -> dict:
    """The holder's record in an open lock file ({} if none, or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "no record of its holder"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def holder_alive(holder: dict) -> bool:
    """Whether the process in a record (on this host) still runs: not gone, not a zombie, not a newer process that
    got the same pid."""
    try:
        process = psutil.Process(holder.get("pid"))
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= holder.get("time", 0) + 1
    except (psutil.Error, TypeError, ValueError):
        return False
