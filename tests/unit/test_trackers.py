"""log_audio: clips reach TensorBoard's audio tab under tag/i, clipped to [-1, 1]; metrics.jsonl survives torn lines."""

import json
import logging
import os

import numpy as np
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hf_audio_trainer.trackers import METRICS_FILE, JSONLinesTracker, log_audio, read_metrics, truncate_metrics


def test_log_audio_writes_each_clip_to_tensorboard(tmp_path):
    accelerator = Accelerator(log_with="tensorboard", project_dir=tmp_path)
    try:
        accelerator.init_trackers("audio")
        clips = [np.zeros(1600, np.float32), np.full(1600, 2.0, np.float32)]  # the loud one is clipped, not refused
        log_audio(accelerator, "reconstructions", clips, step=3, sample_rate=16000)
        accelerator.end_training()
        (events,) = tmp_path.rglob("events.out.tfevents.*")
        board = EventAccumulator(str(events.parent), size_guidance={"audio": 0})
        board.Reload()
        assert sorted(board.Tags()["audio"]) == ["reconstructions/0", "reconstructions/1"]
        (event,) = board.Audio("reconstructions/1")
        assert event.step == 3 and event.sample_rate == 16000
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


# What a full disk or a node crash leaves in metrics.jsonl: half a line, a run of NUL bytes (the file grew, its data
# never reached the disk), bytes that are not even UTF-8.
GOOD = [{"step": s, "time": 100.0 + s, "train/loss": 4.0 - s} for s in (1, 2, 3, 4)]
TORN = [b'{"step": 3, "time": 103.0, "train/lo', b"\0" * 40, b"\xff\xfe{garbage"]


def torn_metrics(folder):
    lines = [json.dumps(GOOD[0]).encode(), json.dumps(GOOD[1]).encode(), TORN[0], json.dumps(GOOD[2]).encode()]
    lines += [TORN[1], json.dumps(GOOD[3]).encode(), TORN[2]]  # the last one without its newline
    (folder / METRICS_FILE).write_bytes(b"\n".join(lines))


def test_torn_lines_are_skipped_with_a_warning(tmp_path, caplog):
    torn_metrics(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_audio_trainer.trackers"):
        assert read_metrics(tmp_path) == GOOD
    (warning,) = caplog.records
    assert "skipped 3 lines that are not JSON (lines 3, 5, 7)" in warning.getMessage()


def test_a_resume_drops_torn_lines_and_the_next_record_starts_whole(tmp_path, caplog):
    torn_metrics(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_audio_trainer.trackers"):
        truncate_metrics(tmp_path, step=3)  # resume from checkpoint-3
    assert "dropped 3 lines that are not JSON" in caplog.text
    JSONLinesTracker(tmp_path).log({"train/loss": 0.5}, step=4)
    lines = (tmp_path / METRICS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["step"] for line in lines[:-1]] == [1, 2, 3, 4]


def test_a_write_cut_short_does_not_take_the_next_record_with_it(tmp_path, monkeypatch):
    tracker = JSONLinesTracker(tmp_path)
    tracker.log({"train/loss": 3.0}, step=1)
    real_write, writes = os.write, []

    def full_disk(fd, data):  # the disk takes the first 10 bytes of the record, then no more
        if b'"train/loss"' not in data:  # someone else's write
            return real_write(fd, data)
        writes.append(data)
        return real_write(fd, data[:10])

    monkeypatch.setattr(os, "write", full_disk)
    tracker.log({"train/loss": 2.0}, step=2)
    monkeypatch.setattr(os, "write", real_write)
    tracker.log({"train/loss": 1.0}, step=3)
    assert len(writes) == 1  # a record is one append, never pieces a crash could separate
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
