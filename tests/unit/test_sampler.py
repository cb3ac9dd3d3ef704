import math

import numpy as np
import pytest
import torch

from hf_audio_trainer.curriculum import CurriculumSampler


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_ranks_split_the_single_process_global_batches():
    n, global_batch = 50, 8
    single = CurriculumSampler([0.0] * n, global_batch, seed=3)
    ranks = [CurriculumSampler([0.0] * n, global_batch, num_replicas=2, rank=r, seed=3) for r in range(2)]
    order = list(single)
    per_rank = [list(s) for s in ranks]
    assert len(order) == len(single) == (n // global_batch) * global_batch
    for step in range(n // global_batch):
        expected = order[step * 8 : (step + 1) * 8]
        assert per_rank[0][step * 4 : (step + 1) * 4] + per_rank[1][step * 4 : (step + 1) * 4] == expected
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(order)) == len(order)  # every index at most once per epoch


def test_order_is_a_function_of_seed_and_epoch():
    a = CurriculumSampler([0.0] * 40, 4, seed=1)
    b = CurriculumSampler([0.0] * 40, 4, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(CurriculumSampler([0.0] * 40, 4, seed=2)) != first


def test_resume_mid_epoch_continues_without_replay():
    straight = CurriculumSampler([0.0] * 40, 4, seed=0)
    full = list(straight)
    resumed = CurriculumSampler([0.0] * 40, 4, seed=0)
    it = iter(resumed)
    head = [next(it) for _ in range(10)]
    state = resumed.state_dict()
    fresh = CurriculumSampler([0.0] * 40, 4, seed=0)
    fresh.load_state_dict(state)
    assert head + list(fresh) == full
    # the state of a step is computed, never replayed
    fresh.load_state_dict(fresh.state_at_step(12))  # 10 steps per epoch -> epoch 1, step 2
    fresh_list = list(fresh)
    straight.set_epoch(1)
    assert fresh_list == list(straight)[8:]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        CurriculumSampler([0.0] * 3, 4)
    with pytest.raises(ValueError, match="split evenly"):
        CurriculumSampler([0.0] * 30, 5, num_replicas=2)
    with pytest.raises(ValueError, match="choose one of"):
        CurriculumSampler([0.0] * 30, 4, pacing="nope")
    with pytest.raises(ValueError, match="seed"):
        CurriculumSampler([0.0] * 30, 4, seed=0).load_state_dict({"epoch": 0, "position": 0, "seed": 1})


def test_epoch_is_a_permutation():
    s = CurriculumSampler(list(range(16)), 4, seed=5)
    assert sorted(s) == list(range(16))
    assert torch.equal(s.epoch_indices(0), s.epoch_indices(0))


class CountingCodes:
    """Stands in for the tokenized dataset and counts the rows read."""

    column_names = ["codes"]

    def __init__(self, n):
        self.rows_read = 0
        self.n = n

    def select_columns(self, columns):
        return self

    def __getitem__(self, indices):
        self.rows_read += len(indices)
        return {"codes": [[[i]] for i in indices]}


def test_batch_stream_jumps_to_a_late_step_without_reading_earlier_rows():
    from hf_audio_trainer.data.codes import batch_stream

    sampler = CurriculumSampler([0.0] * 40, 4, num_replicas=2, rank=1, seed=7)  # 10 steps per epoch
    data = CountingCodes(40)
    stream = batch_stream(data, sampler, micro_batch_size=1, collate=lambda rows: rows, start_step=1_000_003)
    first = next(stream)
    # step 1,000,003 is epoch 100,000, step 3; rank 1's share of it is the 2 indices after rank 0's 2
    expected = sampler.epoch_indices(100_000)[3 * 2].item()
    assert first == [{"codes": [[expected]]}]
    assert data.rows_read == 1  # nothing was replayed


PACED = ["linear", "root", "geometric", "step", "anti"]


def ranks_by_difficulty(difficulties):
    order = np.argsort(difficulties, kind="stable")
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))
    return rank


@pytest.mark.parametrize("pacing", PACED)
def test_every_index_exactly_once_per_epoch_once_pacing_reaches_one(pacing):
    difficulties = np.random.default_rng(0).random(96)
    sampler = CurriculumSampler(difficulties, 8, pacing=pacing, start_fraction=0.25, curriculum_steps=6, seed=1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(96))


@pytest.mark.parametrize("pacing", ["linear", "root", "geometric", "step"])
def test_early_batches_come_from_the_easiest_fraction(pacing):
    difficulties = np.random.default_rng(1).random(200)
    rank = ranks_by_difficulty(difficulties)
    sampler = CurriculumSampler(difficulties, 4, pacing=pacing, start_fraction=0.2, curriculum_steps=1000, seed=2)
    order = sampler.global_order(0).reshape(-1, 4)
    assert rank[order[0]].max() < 40  # step 0: only the easiest 20% (40 clips) are open
    for step in range(20):
        # open at step s: the paced fraction, extended only when its unused indices run out
        allowed = max(sampler.open_count(step), (step + 1) * 4)
        assert rank[order[step]].max() < allowed, step
    # the mean difficulty rises as the harder data opens up
    assert difficulties[order[:10]].mean() < difficulties[order[-10:]].mean()


def test_anti_starts_with_the_hardest():
    difficulties = np.linspace(0, 1, 100)
    sampler = CurriculumSampler(difficulties, 4, pacing="anti", start_fraction=0.1, curriculum_steps=100)
    assert difficulties[sampler.global_order(0)[:4]].min() >= 0.9


def test_pacing_functions_go_from_start_to_one():
    sampler = {
        p: CurriculumSampler(np.arange(1000.0), 10, pacing=p, start_fraction=0.25, curriculum_steps=100)
        for p in ["linear", "root", "geometric", "step"]
    }
    for p, s in sampler.items():
        assert s.open_count(0) == 250, p
        assert s.open_count(100) == s.open_count(5000) == 1000, p
        counts = [s.open_count(t) for t in range(0, 101, 5)]
        assert counts == sorted(counts), p  # never shrinks
    assert sampler["linear"].open_count(50) == 625  # 0.25 + 0.75 / 2
    assert sampler["root"].open_count(50) == math.ceil(1000 * math.sqrt(0.0625 + 0.9375 / 2))
    assert sampler["geometric"].open_count(50) == 500  # 0.25 * 4 ** 0.5
    assert sampler["step"].open_count(49) == 438 and sampler["step"].open_count(50) == 625  # 4 equal stages
    assert sampler["step"].open_count(24) == 250 and sampler["step"].open_count(25) == 438


def test_none_is_an_ordinary_seeded_shuffle():
    sampler = CurriculumSampler(np.zeros(50), 8, seed=4)
    sampler.set_epoch(3)
    assert list(sampler) == np.random.default_rng([4, 3, 0]).permutation(50)[:48].tolist()


@pytest.mark.parametrize("group_by_length", [False, True])
def test_paced_ranks_are_disjoint_equal_and_union_the_single_process_order(group_by_length):
    difficulties = np.random.default_rng(3).random(80)
    lengths = np.random.default_rng(4).integers(10, 100, 80) if group_by_length else None
    kwargs = dict(pacing="root", start_fraction=0.3, curriculum_steps=5, seed=9, lengths=lengths)
    single = list(CurriculumSampler(difficulties, 8, **kwargs))
    per_rank = [list(CurriculumSampler(difficulties, 8, num_replicas=2, rank=r, **kwargs)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 40
    assert not set(per_rank[0]) & set(per_rank[1])
    for step in range(10):
        assert (
            per_rank[0][step * 4 : step * 4 + 4] + per_rank[1][step * 4 : step * 4 + 4]
            == single[step * 8 : step * 8 + 8]
        )


def test_paced_resume_mid_epoch_continues_identically():
    difficulties = np.random.default_rng(5).random(64)
    kwargs = dict(pacing="linear", start_fraction=0.2, curriculum_steps=10, seed=0)
    straight = CurriculumSampler(difficulties, 4, **kwargs)
    full = []
    for epoch in range(2):
        straight.set_epoch(epoch)
        full += list(straight)
    resumed = CurriculumSampler(difficulties, 4, **kwargs)
    resumed.load_state_dict(resumed.state_at_step(21))  # epoch 1, step 5
    assert list(resumed) == full[21 * 4 :]


def test_group_by_length_cuts_padding():
    rng = np.random.default_rng(6)
    lengths = rng.integers(25, 150, 2000)  # frames of 0.5-3 s clips at 50 frames/s
    difficulties = rng.random(2000)

    def padding(sampler, micro=8):
        batches = sampler.global_order(0).reshape(-1, micro)
        longest = lengths[batches].max(axis=1, keepdims=True)
        return 1 - lengths[batches].sum() / (longest * micro).sum()

    plain = padding(CurriculumSampler(difficulties, 32, pacing="linear", curriculum_steps=30))
    grouped = padding(CurriculumSampler(difficulties, 32, pacing="linear", curriculum_steps=30, lengths=lengths))
    assert grouped < plain / 4, (plain, grouped)


def test_bad_scores_and_settings_are_named():
    with pytest.raises(ValueError, match=r"NaN or infinite at rows \[2, 5\]"):
        CurriculumSampler([0.1, 0.2, float("nan"), 0.3, 0.4, float("inf"), 0.5, 0.6], 4, pacing="linear")
    with pytest.warns(UserWarning, match="plain shuffle"):
        sampler = CurriculumSampler([0.5] * 16, 4, pacing="linear")
    assert sorted(sampler) == list(range(16))
    with pytest.raises(ValueError, match="start_fraction=0.0"):
        CurriculumSampler([0.1] * 16, 4, pacing="linear", start_fraction=0.0)
    with pytest.raises(ValueError, match="start_fraction=1.5"):
        CurriculumSampler([0.1] * 16, 4, pacing="linear", start_fraction=1.5)
