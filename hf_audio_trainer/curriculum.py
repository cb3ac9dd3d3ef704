"""Data order and curriculum: one global order for all ranks, paced by difficulty, a pure function of
(seed, epoch, position).

Because the order is computed, not consumed, resuming at any step costs the same as starting: the sampler jumps to
its position instead of replaying the data (accelerate #2016; ModernBERT replayed for 14.5 hours). Because it is
global and then split by rank, a curriculum means the same thing on 1 or 64 processes (SpeechBrain #1722 sorted
per rank and was silently ignored under DDP).
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from hf_audio_trainer.errors import ConfigError

# Pacing name -> competence c(t) in [start, 1]: the fraction of the data, easiest first, open at progress t in [0, 1]
# (t = step / curriculum_steps). Platanios et al. 2019 ("competence-based curriculum") for linear and root.
PACING = {
    "none": lambda t, start: 1.0,
    "linear": lambda t, start: start + (1.0 - start) * t,
    "root": lambda t, start: math.sqrt(start**2 + (1.0 - start**2) * t),
    "geometric": lambda t, start: start * (1.0 / start) ** t,
    "step": lambda t, start: start + (1.0 - start) * math.floor(t * STEP_STAGES) / STEP_STAGES,
    "anti": lambda t, start: start + (1.0 - start) * t,  # linear, over the hardest-first order
}
STEP_STAGES = 4  # "step" opens the data in 4 equal stages
LENGTH_WINDOW = 8  # group_by_length picks each global batch among the next 8 global batches' worth of candidates


def _generator(seed: int, epoch: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, salt])


class CurriculumSampler(Sampler[int]):
    """Yields this rank's indices; each run of `global_batch_size // num_replicas` is its share of one step.

    The global batch of every optimizer step is drawn first and then split by rank, so the union over ranks is what
    a single process would see with the same global batch. At global step s the easiest `c(s) * N` indices are open
    (c from `PACING`, growing from `start_fraction` to 1 over `curriculum_steps`); a step draws its batch at random
    among the open indices not yet used this epoch (so every index is drawn at most once per epoch, and exactly
    once when pacing has reached 1), extending to the next-easiest unused ones when the open ones run out.
    `pacing="none"` is a plain seeded shuffle. Incomplete global batches at an epoch's end are dropped so every
    rank runs the same number of steps.

    With `lengths`, each global batch is drawn among clips of similar length (fewer padded tokens): the candidates
    for a step are the next LENGTH_WINDOW batches' worth in random order, and the batch is the run of neighbours
    by length around the first of them. Within a batch, indices are ordered by length before the split by rank.
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
        lengths: Sequence[int] | None = None,
    ):
        if pacing not in PACING:
            raise ConfigError(f"unknown pacing {pacing!r}; choose one of {sorted(PACING)}")
        if not 0.0 < start_fraction <= 1.0:
            raise ConfigError(f"start_fraction={start_fraction}: must be in (0, 1]")
        if curriculum_steps < 1:
            raise ConfigError(f"curriculum_steps={curriculum_steps}: must be >= 1")
        if global_batch_size % num_replicas:
            raise ConfigError(f"global batch {global_batch_size} does not split evenly over {num_replicas} processes")
        if len(difficulties) < global_batch_size:
            raise ConfigError(
                f"the dataset has {len(difficulties)} examples, fewer than one global batch of {global_batch_size} "
                "(per-device batch x accumulation x processes); use a smaller batch or more data"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if lengths is not None and len(lengths) != len(difficulties):
            raise ValueError(f"{len(lengths)} lengths for {len(difficulties)} examples")
        scores = np.asarray(difficulties, dtype=np.float64)
        if pacing != "none":
            bad = np.flatnonzero(~np.isfinite(scores))
            if len(bad):
                raise ConfigError(
                    f"difficulty is NaN or infinite at rows {bad[:10].tolist()}; rescore the data or drop those rows"
                )
            if np.ptp(scores) == 0:
                warnings.warn("all difficulty scores are equal: the curriculum is a plain shuffle", stacklevel=2)
        # easiest first (hardest first for "anti"); ties keep dataset order so the order is reproducible
        self.by_difficulty = np.argsort(-scores if pacing == "anti" else scores, kind="stable")
        self.global_batch_size = global_batch_size
        self.pacing = pacing
        self.start_fraction = start_fraction
        self.curriculum_steps = curriculum_steps
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.num_samples = len(scores)
        self.steps_per_epoch = self.num_samples // global_batch_size
        self.epoch = 0
        self.position = 0  # indices of this epoch already yielded by this rank
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.num_replicas

    def __len__(self) -> int:
        return self.steps_per_epoch * self.per_rank

    def open_count(self, step: int) -> int:
        """How many of the easiest indices are open at global optimizer step `step`."""
        progress = min(step / self.curriculum_steps, 1.0)
        competence = min(PACING[self.pacing](progress, self.start_fraction), 1.0)
        return max(math.ceil(competence * self.num_samples), self.global_batch_size)

    def global_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices for one epoch, step after step: [steps_per_epoch * global_batch_size]."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = _generator(self.seed, epoch)
        g, n = self.global_batch_size, self.steps_per_epoch * self.global_batch_size
        first_step = epoch * self.steps_per_epoch
        if self.pacing == "none" or self.open_count(first_step) >= self.num_samples:
            order = self._draw_open(rng.permutation(self.num_samples), n)
        else:
            order = self._draw_paced(rng, first_step)
        if self.lengths is not None:  # similar lengths next to each other inside a batch, before the rank split
            batches = order.reshape(-1, g)
            order = np.take_along_axis(batches, np.argsort(self.lengths[batches], axis=1, kind="stable"), 1).ravel()
        self._cached = (epoch, order)
        return order

    def _draw_open(self, shuffled: np.ndarray, count: int) -> np.ndarray:
        """Everything open: batches in random order (grouped by length when asked)."""
        if self.lengths is None:
            return shuffled[:count]
        # keys are positions in the shuffle (already a heap), so popping them goes through it in random order
        return self._pop_batches(list(range(len(shuffled))), shuffled, count // self.global_batch_size)

    def _draw_paced(self, rng: np.random.Generator, first_step: int) -> np.ndarray:
        """Step by step: open the next-easiest indices, then draw the batch at random among the open unused ones.

        Each index gets one random key per epoch; a min-heap of the keys of open, unused indices gives "a random
        draw among them" in O(log n) per index, so an epoch of a million items takes about a second.
        """
        keys = rng.permutation(self.num_samples)  # key of the index at difficulty rank r: keys[r]
        key_to_index = np.empty(self.num_samples, dtype=np.int64)
        key_to_index[keys] = self.by_difficulty
        heap: list[int] = []
        opened, picked = 0, []
        for step in range(self.steps_per_epoch):
            target = self.open_count(first_step + step)
            if target >= self.num_samples:  # fully open: the rest is a plain draw, done in one go
                remaining = self.steps_per_epoch - step
                unused = np.sort(np.concatenate([np.asarray(heap, dtype=np.int64), keys[opened:]]))
                if self.lengths is None:
                    picked.append(key_to_index[unused[: remaining * self.global_batch_size]])
                else:
                    picked.append(self._pop_batches(unused.tolist(), key_to_index, remaining))  # sorted: a heap
                break
            # at least one batch of unused indices must be open: extend to the next-easiest ones if not
            target = max(target, opened + max(self.global_batch_size - len(heap), 0))
            for key in keys[opened:target].tolist():
                heapq.heappush(heap, key)
            opened = target
            picked.append(self._pop_batches(heap, key_to_index, 1))
        return np.concatenate(picked)

    def _pop_batches(self, heap: list[int], key_to_index: np.ndarray, batches: int) -> np.ndarray:
        """Pop `batches` global batches off a heap of keys (grouping by length when asked)."""
        g = self.global_batch_size
        if self.lengths is None:
            return key_to_index[[heapq.heappop(heap) for _ in range(batches * g)]]
        out = []
        for _ in range(batches):
            # candidates: the next LENGTH_WINDOW batches' worth in random order; keep the run of neighbours by
            # length around the first (random) one, put the others back
            candidates = np.array([heapq.heappop(heap) for _ in range(min(LENGTH_WINDOW * g, len(heap)))])
            lengths = self.lengths[key_to_index[candidates]]
            by_length = np.argsort(lengths, kind="stable")
            anchor = int(np.flatnonzero(by_length == 0)[0])
            start = min(max(anchor - g // 2, 0), len(candidates) - g)
            chosen = by_length[start : start + g]
            for key in np.delete(candidates, chosen).tolist():
                heapq.heappush(heap, key)
            out.append(key_to_index[candidates[chosen]])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for a whole epoch, in order."""
        steps = self.global_order(epoch).reshape(self.steps_per_epoch, self.num_replicas, self.per_rank)
        return torch.from_numpy(steps[:, self.rank].reshape(-1).copy())

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
            raise ConfigError(f"the checkpoint's data order used seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def state_at_step(self, step: int) -> dict[str, int]:
        """The state after `step` optimizer steps, for a checkpoint (prefetching makes the live position run ahead)."""
        return {
            "epoch": step // self.steps_per_epoch,
            "position": step % self.steps_per_epoch * self.per_rank,
            "seed": self.seed,
        }
