"""Batches by duration: within the budget, every clip once per epoch, the same number of micro-batches per step on
every rank, resume without replay, less padding than fixed-size batches."""

import numpy as np
import pytest

from hf_audio_trainer.batching import TokenBudgetSampler
from hf_audio_trainer.data.segments import segment_schedule
from hf_audio_trainer.errors import ConfigError

K = 4  # tokens per frame (codebooks)


def lengths(n=600, seed=0):
    return np.random.default_rng(seed).integers(20, 400, size=n)


def cost(batch, lens, window):
    return len(batch) * int(np.minimum(lens[batch], window).max()) * K


def test_every_micro_batch_fits_and_every_clip_comes_at_most_once_per_epoch():
    lens = lengths()
    sampler = TokenBudgetSampler(lens, max_tokens=8000, tokens_per_frame=K, micro_batches_per_step=3, seed=1)
    plan = sampler.plan(0)
    assert all(len(step) == 3 for step in plan)
    drawn = np.concatenate([b for step in plan for b in step])
    assert len(drawn) == len(set(drawn.tolist()))
    assert len(drawn) > 0.9 * len(lens)  # only the last incomplete step's clips are left out
    assert all(cost(b, lens, 10**9) <= 8000 for step in plan for b in step)
    assert sampler.plan(1) != plan and [len(s) for s in sampler.plan(0)] == [len(s) for s in plan]  # cached, new order


def test_ranks_split_each_step_into_equal_numbers_of_micro_batches():
    lens = lengths()
    whole = TokenBudgetSampler(lens, 8000, K, micro_batches_per_step=4, num_replicas=1, seed=2)
    ranks = [TokenBudgetSampler(lens, 8000, K, 2, num_replicas=2, rank=r, seed=2) for r in (0, 1)]
    steps = whole.steps_per_epoch
    streams = [r.micro_batches() for r in ranks]
    straight = whole.micro_batches()
    for _ in range(steps + 3):  # past the epoch's end
        mine = [[next(s)[0] for _ in range(2)] for s in streams]
        expected = [next(straight)[0] for _ in range(4)]
        assert mine[0] + mine[1] == expected  # 2 processes x 2 micro-batches = 1 process x 4, batch for batch


def test_resume_at_a_step_continues_the_straight_stream():
    lens = lengths(300)
    sampler = TokenBudgetSampler(lens, 6000, K, micro_batches_per_step=2, seed=3)
    straight = sampler.micro_batches()
    everything = [next(straight) for _ in range(2 * (2 * sampler.steps_per_epoch + 5))]
    for step in (0, 1, sampler.steps_per_epoch - 1, sampler.steps_per_epoch, sampler.steps_per_epoch + 4):
        resumed = sampler.micro_batches(start_step=step)
        assert [next(resumed) for _ in range(6)] == everything[2 * step : 2 * step + 6]
    assert everything[2 * sampler.steps_per_epoch][2] == 1  # the epoch is reported with each micro-batch


def test_less_padding_than_fixed_size_batches():
    lens = lengths(2000)
    sampler = TokenBudgetSampler(lens, 16 * 200 * K, K, micro_batches_per_step=1, seed=4)
    budget_batches = [b for step in sampler.plan(0) for b in step]
    fixed = np.random.default_rng(4).permutation(len(lens))[: 2000 // 16 * 16].reshape(-1, 16)

    def padding(batches):
        padded = sum(len(b) * lens[b].max() for b in batches)
        return 1 - sum(lens[b].sum() for b in batches) / padded

    assert padding(budget_batches) < 0.15 < 0.4 < padding(fixed)  # uniform 20-400 frames: ~44% padding in 16s


def test_a_growing_window_packs_more_short_windows_into_the_same_budget():
    lens = np.full(4000, 1000)
    schedule = segment_schedule(400, "linear", start_fraction=0.25, steps=50)
    sampler = TokenBudgetSampler(lens, 3200, K, micro_batches_per_step=1, seed=5, segment_frames=schedule)
    stream = sampler.micro_batches()
    first = next(stream)
    assert first[1] == 100 and len(first[0]) == 3200 // (100 * K)  # 8 windows of 100 frames
    for _ in range(60):
        batch = next(stream)
    assert batch[1] == 400 and len(batch[0]) == 2  # 2 full windows: the same tokens per step


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="smaller than one window"):
        TokenBudgetSampler([100, 500], 1000, K, 1, segment_frames=400)
    with pytest.raises(ConfigError, match="do not fill one step"):
        TokenBudgetSampler([100, 100], 400, K, micro_batches_per_step=4)


def test_the_budget_counts_what_the_collator_pads_to():
    import torch

    from hf_audio_trainer.data.codes import CodesCollator

    lens = lengths(400, seed=6)
    sampler = TokenBudgetSampler(lens, 4000, K, micro_batches_per_step=1, seed=6, extra_frames=K - 1)
    collate = CodesCollator(K, pad_id=256, bos_id=256, frame_rate=50.0)
    sizes = []
    for indices, _, _ in (next(s) for s in [sampler.micro_batches()] * 40):
        batch = collate([{"codes": torch.zeros(K, int(lens[i]), dtype=torch.long).tolist()} for i in indices])
        sizes.append(batch["input_ids"].numel())  # clips x codebooks x (longest + K - 1 delay positions)
    assert max(sizes) <= 4000 < max(sizes) * 1.5  # within the budget, and filling most of it


def _through_epoch(stream, epoch: int) -> list:
    """The stream's micro-batches up to and including the first one of `epoch`."""
    out = [next(stream)]
    while out[-1][2] < epoch:
        out.append(next(stream))
    return out


def test_a_late_epoch_resumes_by_packing_one_epoch_with_the_same_batches(monkeypatch):
    lens = lengths(300)
    # the windows grow over the first epochs, so an epoch's plan depends on the step it starts at
    schedule = segment_schedule(400, "linear", start_fraction=0.25, steps=60)
    settings = dict(micro_batches_per_step=2, seed=3, segment_frames=schedule)
    sampler = TokenBudgetSampler(lens, 6000, K, **settings)
    straight = _through_epoch(sampler.micro_batches(), 13)
    step = [b[2] for b in straight].index(12) // 2 + 3  # three steps into epoch 12
    expected = straight[2 * step : 2 * step + 8]
    assert {b[2] for b in expected} == {12}
    saved = sampler.state_at_step(step)

    packed = []
    real_pack = TokenBudgetSampler._pack
    monkeypatch.setattr(TokenBudgetSampler, "_pack", lambda self, *a: packed.append(a[0]) or real_pack(self, *a))
    resumed = TokenBudgetSampler(lens, 6000, K, **settings)
    resumed.load_state_dict(saved)
    assert [next(s) for s in [resumed.micro_batches(step)] * 8] == expected
    assert packed == [0, 12]  # epoch 0 (the budget check) and the one it resumes in: none of the eleven between

    # A checkpoint without the epoch (an older one), or one planned from other data, walks from epoch 0: same batches.
    for state in ({"step": step, "seed": 3}, {**saved, "plan": "another dataset"}):
        walked = TokenBudgetSampler(lens, 6000, K, **settings)
        walked.load_state_dict(state)
        assert [next(s) for s in [walked.micro_batches(step)] * 8] == expected


def test_walking_many_epochs_keeps_one_epochs_plan():
    import tracemalloc

    sampler = TokenBudgetSampler(lengths(2000), 6000, K, micro_batches_per_step=2, seed=3)
    stream = sampler.micro_batches()
    tracemalloc.start()
    try:
        held = []
        for epoch in (1, 12):
            while next(stream)[2] < epoch:
                pass
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # keeping every epoch's plan would hold about 12 times as much at epoch 12 as at epoch 1
    assert held[1] < 1.5 * held[0], held
