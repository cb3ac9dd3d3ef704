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
