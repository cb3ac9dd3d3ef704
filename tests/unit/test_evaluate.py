"""Evaluation over several processes: every rank runs as many forwards and reduces the same keys, and the padding
that evens the forwards out weighs nothing, so the ranks' sums are one process's."""

import pytest
import torch
from datasets import Dataset

from hf_audio_trainer.data.codes import eval_batches
from hf_audio_trainer.loop import evaluate_metrics

VALUES = [0.5, -1.25, 3.0]  # exact in binary: sums in any order are equal


class OneRank:
    """An Accelerator stand-in for one of several processes: keeps what it would all-reduce and returns it."""

    device = torch.device("cpu")

    def __init__(self):
        self.reduced: list[torch.Tensor] = []

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.reduced.append(tensor)
        return tensor


class CountingIdentity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return x


def collate(examples: list[dict]) -> dict:
    n = len(examples)
    return {"x": torch.tensor([ex["x"] for ex in examples]), "num_items": n, "num_samples": n, "audio_seconds": 0.0}


def dpo_like_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss sum and named per-item sums, the way the DPO objective returns its rewards."""
    out = model(batch["x"])
    return out.sum(), {"rewards/margins": (2 * out).sum(), "rewards/accuracies": (out > 0).float().sum()}


@pytest.mark.parametrize("num_rows, batch_size", [(1, 4), (3, 1)])  # rank 1 without rows; ranks of 2 and 1 batches
def test_ranks_run_as_many_forwards_reduce_the_same_keys_and_sum_to_one_process(num_rows, batch_size):
    dataset = Dataset.from_dict({"x": VALUES[:num_rows]})

    def evaluate(rank: int, world: int) -> tuple[OneRank, CountingIdentity, dict[str, float]]:
        acc, model = OneRank(), CountingIdentity()
        stream = lambda: eval_batches(dataset, batch_size, collate, rank, world, ["x"])  # noqa: E731
        return acc, model, evaluate_metrics(acc, model, stream, dpo_like_loss)

    (acc0, model0, metrics0), (acc1, model1, metrics1) = evaluate(0, 2), evaluate(1, 2)
    one, _, expected = evaluate(0, 1)
    assert acc0.reduced[0].shape == acc1.reduced[0].shape  # one all-reduce of the same size on every rank
    assert model0.forwards == model1.forwards  # the sharded forward is a collective: no rank may stop early
    assert metrics0.keys() == metrics1.keys() == expected.keys() == {"loss", "rewards/margins", "rewards/accuracies"}
    assert torch.equal(acc0.reduced[0] + acc1.reduced[0], one.reduced[0])  # padding added exactly nothing
