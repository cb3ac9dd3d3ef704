"""Batches by duration: a micro-batch holds as many clips as fit in a token budget, clips of similar length together.

lhotse's `max_duration` and F5-TTS's frame budget batch this way: short clips come many to a batch, long ones few,
and little of a batch is padding. What this sampler adds is what distributed training needs of it: one global plan
per epoch, a pure function of (seed, epoch), in which every optimizer step is `accumulation x processes`
micro-batches, so every rank runs the same number of micro-batches per step (a collective can never wait for a rank
that has none left), and resuming at a step recomputes the plan (index arithmetic) instead of replaying data.
The loop weights the loss by target tokens, so micro-batches of different sizes still add up to one exact step.

A micro-batch's cost is what it pads to: clips x longest clip x tokens per frame. Under a sequence-length curriculum
the window (and so each clip's length) grows with the step, and the budget stays fixed: the global batch is measured
in tokens, so early steps are many short windows and steps stay comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from hf_audio_trainer.errors import ConfigError

POOL_BATCHES = 8  # a micro-batch is chosen among the next ~8 micro-batches' worth of clips (in random order)
PLAN_SALT = 11
MAX_POOL = 4096  # bounds the per-micro-batch sort when clips are tiny next to the budget


class TokenBudgetSampler:
    """This rank's micro-batches: (row indices, window frames) with clips x (longest + extra_frames) x
    tokens_per_frame <= budget (`extra_frames`: what the collator adds to every clip, MusicGen's delay pattern).

    `lengths` are the tracks' frames; a clip's length at a step is min(length, segment_frames(step)). Each micro-batch
    starts from the oldest clip of a pool filled in the epoch's random order, and takes its neighbours by length
    while the budget holds. Incomplete steps at an epoch's end are dropped, as the fixed-size sampler drops
    incomplete global batches; every clip is drawn at most once per epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        tokens_per_frame: int,
        micro_batches_per_step: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        segment_frames: Callable[[int], int] | int | None = None,
        extra_frames: int = 0,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if isinstance(segment_frames, int) or segment_frames is None:
            fixed = int(self.lengths.max()) if segment_frames is None else segment_frames
            segment_frames = lambda step: fixed  # noqa: E731
        self.segment_frames = segment_frames
        self.max_tokens, self.tokens_per_frame, self.extra_frames = max_tokens, tokens_per_frame, extra_frames
        self.accumulation, self.num_replicas, self.rank, self.seed = micro_batches_per_step, num_replicas, rank, seed
        self.per_step = micro_batches_per_step * num_replicas
        longest = int(min(self.lengths.max(), max(segment_frames(0), segment_frames(10**12))))
        if (longest + extra_frames) * tokens_per_frame > max_tokens:
            raise ConfigError(
                f"max_tokens_per_batch={max_tokens} is smaller than one window ({longest} frames + {extra_frames} of "
                f"delay, x {tokens_per_frame} codebooks = {(longest + extra_frames) * tokens_per_frame} tokens); raise "
                "it or lower --segment_seconds"
            )
        self._plans: list[list[list[np.ndarray]]] = []  # epoch -> steps -> micro-batches, computed in order
        if not self.plan(0):
            raise ConfigError(
                f"the dataset's {len(self.lengths)} clips do not fill one step of {self.per_step} micro-batches "
                f"(accumulation x processes) of {max_tokens} tokens; use more data, a smaller --max_tokens_per_batch "
                "or less accumulation"
            )
        self.steps_per_epoch = len(self.plan(0))
        self.epoch = 0

    def first_step(self, epoch: int) -> int:
        return sum(len(self.plan(e)) for e in range(epoch))

    def plan(self, epoch: int) -> list[list[np.ndarray]]:
        """All ranks' micro-batches of an epoch, step by step (each step `per_step` index arrays)."""
        while len(self._plans) <= epoch:
            e = len(self._plans)
            start = sum(len(p) for p in self._plans)
            self._plans.append(self._pack(e, start))
        return self._plans[epoch]

    def _pack(self, epoch: int, first_step: int) -> list[list[np.ndarray]]:
        order = np.random.default_rng([self.seed, epoch, PLAN_SALT]).permutation(len(self.lengths))
        pool: list[int] = []  # positions in `order`, oldest first
        taken = 0
        steps = []
        sized: dict[int, tuple[np.ndarray, int]] = {}  # window -> (clip lengths, pool size): windows change rarely
        while True:
            segment = self.segment_frames(first_step + len(steps))
            if segment not in sized:
                clip_lengths = np.minimum(self.lengths, segment)
                typical_frames = max(1, int(np.median(clip_lengths))) + self.extra_frames
                typical = max(1, self.max_tokens // (self.tokens_per_frame * typical_frames))
                sized[segment] = clip_lengths, min(POOL_BATCHES * typical, MAX_POOL)
            clip_lengths, want = sized[segment]
            step = []
            for _ in range(self.per_step):
                while len(pool) < want and taken < len(order):
                    pool.append(taken)
                    taken += 1
                if not pool:
                    return steps  # the epoch's last, incomplete step is dropped
                chosen = self._choose(order, pool, clip_lengths)
                step.append(order[np.asarray([pool[i] for i in chosen])])
                used = set(chosen.tolist())
                pool = [p for i, p in enumerate(pool) if i not in used]
            steps.append(step)

    def _choose(self, order: np.ndarray, pool: list[int], clip_lengths: np.ndarray) -> np.ndarray:
        """Pool slots of one micro-batch: the oldest clip and its neighbours by length, within the budget."""
        lengths = clip_lengths[order[np.asarray(pool)]]
        by_length = np.argsort(lengths, kind="stable")
        anchor = int(np.flatnonzero(by_length == 0)[0])
        low = high = anchor  # the run by_length[low : high + 1]
        while True:
            grew = False
            for lo, hi in ((low, high + 1), (low - 1, high)):  # try the next-longer, then the next-shorter
                if lo < 0 or hi >= len(by_length):
                    continue
                padded = int(lengths[by_length[hi]]) + self.extra_frames
                if (hi - lo + 1) * padded * self.tokens_per_frame <= self.max_tokens:
                    low, high, grew = lo, hi, True
                    break
            if not grew:
                return by_length[low : high + 1]

    def micro_batches(self, start_step: int = 0) -> Iterator[tuple[list[int], int, int]]:
        """Endless (indices, window frames, epoch) of this rank's micro-batches from optimizer step `start_step` on."""
        epoch, first = 0, 0
        while first + len(self.plan(epoch)) <= start_step:
            first += len(self.plan(epoch))
            epoch += 1
        step = start_step
        while True:
            for local in range(step - first, len(self.plan(epoch))):
                mine = self.plan(epoch)[local][self.rank * self.accumulation : (self.rank + 1) * self.accumulation]
                segment = self.segment_frames(first + local)
                for indices in mine:
                    yield indices.tolist(), segment, epoch
            first += len(self.plan(epoch))
            epoch += 1
            step = first
            self.epoch = epoch

    def state_at_step(self, step: int) -> dict[str, int]:
        """A checkpoint's data position: the step says it all (the plan is recomputed from the seed)."""
        return {"step": step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(f"the checkpoint's data order used seed {state['seed']}, this run uses {self.seed}")
