"""Data order: one global order for all ranks, split per rank, a pure function of (seed, epoch, position).

Because the order is computed, not consumed, resuming at any step costs the same as starting: the sampler jumps
to its position instead of replaying the data (accelerate #2016; ModernBERT replayed for 14.5 hours).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _shuffled(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


# Pacing name -> function(difficulties, seed, epoch) giving the global order of one epoch.
PACING = {"none": lambda difficulties, seed, epoch: _shuffled(len(difficulties), seed, epoch)}


class CurriculumSampler(Sampler[int]):
    """Yields this rank's indices; each run of `global_batch_size // num_replicas` is its share of one step.

    The global batch of every optimizer step is drawn first and then split by rank, so the union over ranks is what
    a single process would see with the same global batch. Incomplete global batches at the end of an epoch are
    dropped so every rank runs the same number of steps.
    """

    def __init__(
        self,
        difficulties: Sequence[float],
        global_batch_size: int,
        pacing: str = "none",
        start_fraction: float = 0.2,
        curriculum_steps: int = 1000,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if pacing not in PACING:
            raise ValueError(f"unknown pacing {pacing!r}; choose one of {sorted(PACING)}")
        if global_batch_size % num_replicas:
            raise ValueError(f"global batch {global_batch_size} does not split evenly over {num_replicas} processes")
        if len(difficulties) < global_batch_size:
            raise ValueError(
                f"the dataset has {len(difficulties)} examples, fewer than one global batch of {global_batch_size} "
                "(per-device batch x accumulation x processes); use a smaller batch or more data"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.difficulties = difficulties
        self.global_batch_size = global_batch_size
        self.pacing = pacing
        self.start_fraction = start_fraction
        self.curriculum_steps = curriculum_steps
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = len(difficulties) // global_batch_size
        self.epoch = 0
        self.position = 0  # indices of this epoch already yielded by this rank

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.num_replicas

    def __len__(self) -> int:
        return self.steps_per_epoch * self.per_rank

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for a whole epoch, in order."""
        order = PACING[self.pacing](self.difficulties, self.seed, epoch)[
            : self.steps_per_epoch * self.global_batch_size
        ]
        steps = order.view(self.steps_per_epoch, self.num_replicas, self.per_rank)
        return steps[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch).tolist()
        while self.position < len(indices):
            self.position += 1
            yield indices[self.position - 1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's data order used seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def state_at_step(self, step: int) -> dict[str, int]:
        """The state after `step` optimizer steps, for a checkpoint (prefetching makes the live position run ahead)."""
        return {
            "epoch": step // self.steps_per_epoch,
            "position": step % self.steps_per_epoch * self.per_rank,
            "seed": self.seed,
        }
