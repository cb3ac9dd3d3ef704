"""Windows of long tracks: pure functions of (seed, epoch, row), every part of a track drawn over epochs, fixed
middle windows for validation, and window lengths that grow with a pacing."""

import datasets
import numpy as np

from hf_audio_trainer.data.segments import middle_windows, segment_schedule, take_window, window_start


def test_a_short_clip_is_used_whole():
    assert window_start(0, 3, 5, num_frames=100, segment_frames=100) == 0
    assert window_start(0, 3, 5, num_frames=40, segment_frames=100) == 0


def test_windows_of_a_3_minute_track_cover_it_over_epochs_and_are_pure():
    frames, window = 180 * 50, 30 * 50  # a 3-minute track at 50 frames/s, 30-s windows: 6 of them cover it
    starts = [window_start(7, epoch, 11, frames, window) for epoch in range(12)]
    assert starts == [window_start(7, epoch, 11, frames, window) for epoch in range(12)]  # a pure function
    assert all(0 <= s <= frames - window for s in starts)
    assert sorted(starts[:6]) == [0, 1500, 3000, 4500, 6000, 7500]  # the grid, each window once
    seen = np.zeros(frames, bool)
    for s in starts[:6]:
        seen[s : s + window] = True
    assert seen.all()  # the first 6 epochs draw every frame of the track
    assert starts[6:] != starts[:6] and len(set(starts[6:])) == 6  # later rounds cut elsewhere, still spread out
    assert sorted(s // 1500 for s in starts[6:]) != [0] * 6
    # another row (or seed) draws the windows in another order
    others = [[window_start(7, e, row, frames, window) for e in range(6)] for row in range(12, 16)]
    assert any(o != starts[:6] for o in others)
    assert starts != [window_start(8, epoch, 11, frames, window) for epoch in range(12)]


def test_take_window_and_the_middle_windows_of_validation():
    codes = [list(range(10)), list(range(10, 20))]
    assert take_window(codes, 3, 4) == [[3, 4, 5, 6], [13, 14, 15, 16]]
    split = datasets.Dataset.from_dict({"codes": [codes, [[1, 2], [3, 4]]], "num_frames": [10, 2]})
    cut = middle_windows(split, 4)
    assert cut["codes"] == [[[3, 4, 5, 6], [13, 14, 15, 16]], [[1, 2], [3, 4]]]  # start (10 - 4) // 2 = 3
    assert cut["num_frames"] == [4, 2]
    assert middle_windows(split, 10) is split  # nothing longer than a window: unchanged


def test_segment_schedule_grows_with_the_pacing():
    fixed = segment_schedule(400)
    assert fixed(0) == fixed(10_000) == 400
    linear = segment_schedule(400, "linear", start_fraction=0.25, steps=100)
    assert [linear(s) for s in (0, 50, 100, 5000)] == [100, 250, 400, 400]  # 400 x (0.25 + 0.75 t)
    root = segment_schedule(400, "root", start_fraction=0.25, steps=100)
    assert root(50) == round(400 * np.sqrt(0.25**2 + (1 - 0.25**2) * 0.5))
    tiny = segment_schedule(400, "linear", start_fraction=0.001, steps=100)
    assert tiny(0) == 8  # never shorter than MIN_SEGMENT_FRAMES
