"""log_audio: clips reach TensorBoard's audio tab under tag/i, clipped to [-1, 1]."""

import numpy as np
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hf_audio_trainer.trackers import log_audio


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
