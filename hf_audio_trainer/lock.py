"""One run per output folder: an exclusive lock held for the whole run.

The lock is `fcntl.flock` on `OUTPUT_DIR/.lock`, so the kernel drops it the moment its holder dies: a run killed with
`kill -9` leaves no lock that blocks the next resume. The file also records who holds it (pid, host, since when), for
the message a second run gets; a record left behind by a killed run is recognised as stale and taken over with a
note. Under several processes or machines only the main process of the run takes it (one lock per output folder).

Some shared filesystems honour `flock` only within one machine, so a free lock says nothing of a run on another host.
The holder therefore rewrites its record's time every `refresh_every` seconds, and a record from another host is taken
over only once it has gone unrefreshed for `STALE_AFTER` of those intervals. The record never holds the command line
(a `--hub_token` would be on it): the file is readable by everyone who can read the folder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from hf_audio_trainer.errors import LockedError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
REFRESH_SECONDS = 30.0
# intervals without a refresh before another host's record counts as a dead run's: room for a slow filesystem, a
# stalled process and clocks that differ by up to a minute
STALE_AFTER = 4
# every record is written padded to this size in one write at offset 0, so a reader never sees a half-replaced one
RECORD_BYTES = 512


class OutputLock:
    """`acquire()` the output folder or raise `LockedError` naming the holder; `release()` (also on any exit)."""

    def __init__(self, output_dir: str | os.PathLike, refresh_every: float = REFRESH_SECONDS):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None
        self.record: dict = {}
        self.refresh_every = refresh_every
        self.stale_after = STALE_AFTER * refresh_every
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

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
            problem = self._live_elsewhere(previous)
            if problem is not None:
                os.close(fd)
                raise LockedError(problem)
            note = f"took over the lock of a run that ended without releasing it ({describe(previous)}; killed?)"
        now = time.time()
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "time": now,
            "refreshed": now,
            "refresh_every": self.refresh_every,
            "program": os.path.basename(sys.argv[0]) if sys.argv else "",  # its name only, never its arguments
        }
        self.fd = fd
        self._write()
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh, name="output-lock", daemon=True)
        self._refresher.start()
        return note

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: removing it would let two runs lock two files)."""
        if self.fd is None:
            return
        self._stop.set()
        self._refresher.join()  # a refresh after the clearing would bring the record back
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None

    def _live_elsewhere(self, previous: dict) -> str | None:
        # the lock was free, yet the record may belong to a run that still lives: why that run was not stopped
        folder = self.path.parent
        if previous.get("host") == socket.gethostname():
            if previous.get("pid") != os.getpid() and holder_alive(previous):
                # this filesystem does not honour flock (some network filesystems); refusing is the only safe answer
                return (
                    f"output_dir {folder} is recorded as in use by a live run ({describe(previous)}) but its lock is "
                    "not held: the filesystem may not support locks. Stop that run or use another --output_dir"
                )
            return None
        age = time.time() - _number(previous.get("refreshed", previous.get("time")))
        stale_after = STALE_AFTER * _number(previous.get("refresh_every"), REFRESH_SECONDS)
        if age < stale_after:
            return (
                f"output_dir {folder} is in use by a run on another machine ({describe(previous)}, its record "
                f"refreshed {age:.0f} s ago): this filesystem may hold locks only within a machine. Stop that run, or "
                f"if it is gone, start again once its record is {stale_after:.0f} s old, or pass another --output_dir"
            )
        return None

    def _write(self) -> None:
        data = json.dumps(self.record).encode().ljust(RECORD_BYTES)
        os.pwrite(self.fd, data, 0)
        if os.fstat(self.fd).st_size > len(data):  # an older, longer record
            os.ftruncate(self.fd, len(data))
        os.fsync(self.fd)  # a network filesystem shows other machines only what reached the server

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_every):
            self.record["refreshed"] = time.time()
            try:
                self._write()
            except OSError as err:  # a full disk or a hiccup of the filesystem: the next interval tries again
                logger.warning("could not refresh the lock record %s: %s", self.path, err)


def _number(value, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def read_holder(fd: int) -> dict:
    """The holder's record in an open lock file ({} if none, or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        record = json.loads(text) if text.strip() else {}
        return record if isinstance(record, dict) else {}
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
