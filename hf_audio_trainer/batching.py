"""Batches by duration: a micro-batch holds as many clips as fit in a token budget, clips of similar length together.

lhotse's `max_duration` and F5-TTS's frame budget batch this way: short clips come many to a batch, long ones few,
and little of a batch is padding. What this sampler adds is what distributed training needs of it: one global plan
per epoch, a pure function of (seed, epoch), in which every optimizer step is `accumulation x processes`
micro-batches, so every rank runs the same number of micro-batches per step (a collective can never wait for a rank
that has none left), and resuming at a step recomputes a plan instead of replaying data. Epochs differ in length
(and, under a growing window, a plan depends on the step its epoch starts at), so a checkpoint also records the
epoch its step is in and that epoch's first step: a resume packs that one epoch, and only one plan is ever held.
The loop weights the loss by target tokens, so micro-batches of different sizes still add up to one exact step.

A micro-batch's cost is what it pads to: clips x longest clip x tokens per frame. Under a sequence-length curriculum
the window (and so each clip's length) grows with the step, and the budget stays fixed: the global batch is measured
in tokens, so early steps are many short windows and steps stay comparable.
"""

from __future__ import annotations

import hashlib
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
        # Only one epoch's plan is kept, and the first steps of a few epochs (0 and the latest two, where walks and
        # checkpoints start): memory and a resume's work do not grow with the epoch.
        self._plan: tuple[int, list[list[np.ndarray]]] | None = None
        self._starts = {0: 0}
        self.fingerprint = self._fingerprint()
        if not self.plan(0):
            raise ConfigError(
                f"the dataset's {len(self.lengths)} clips do not fill one step of {self.per_step} micro-batches "
                f"(accumulation x processes) of {max_tokens} tokens; use more data, a smaller --max_tokens_per_batch "
                "or less accumulation"
            )
        self.steps_per_epoch = len(self.plan(0))
        self.epoch = 0

    def _fingerprint(self) -> str:
        """A hash of what the plans depend on, so a checkpoint's epoch start is used only for the same plans."""
        digest = hashlib.sha256(self.lengths.tobytes())
        # the window schedule at log-spaced steps: its start, end and ramp length
        windows = [self.segment_frames(0), *(self.segment_frames(2**k) for k in range(48))]
        settings = [PLAN_SALT, self.seed, self.max_tokens, self.tokens_per_frame, self.per_step, self.extra_frames]
        digest.update(repr([settings, windows]).encode())
        return digest.hexdigest()[:16]

    def _remember(self, epoch: int, first_step: int) -> None:
        self._starts[epoch] = first_step
        for old in sorted(self._starts)[1:-2]:
            del self._starts[old]

    def _known(self, step: int) -> tuple[int, int]:
        """(epoch, its first step) of the latest remembered epoch that starts at or before `step`."""
        epoch = max(e for e, first in self._starts.items() if first <= step)
        return epoch, self._starts[epoch]

    def first_step(self, epoch: int) -> int:
        """The step `epoch` starts at, counted from the nearest remembered epoch before it (packing those between)."""
        known = max(e for e in self._starts if e <= epoch)
        first = self._starts[known]
        for e in range(known, epoch):
            first += len(self._planned(e, first))
        return first

    def plan(self, epoch: int) -> list[list[np.ndarray]]:
        """All ranks' micro-batches of an epoch, step by step (each step `per_step` index arrays)."""
        return self._planned(epoch, self.first_step(epoch))

    def _planned(self, epoch: int, first_step: int) -> list[list[np.ndarray]]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = None  # let the previous plan go before packing the next
            self._plan = (epoch, self._pack(epoch, first_step))
        return self._plan[1]

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
        epoch, first = self._known(start_step)
        plan = self._planned(epoch, first)
        while first + len(plan) <= start_step:
            first, epoch = first + len(plan), epoch + 1
            plan = self._planned(epoch, first)
        self._remember(epoch, first)
        step = start_step
        while True:
            for local in range(step - first, len(plan)):
                mine = plan[local][self.rank * self.accumulation : (self.rank + 1) * self.accumulation]
                segment = self.segment_frames(first + local)
                for indices in mine:
                    yield indices.tolist(), segment, epoch
            first, epoch = first + len(plan), epoch + 1
            step = first
            self.epoch = epoch
            self._remember(epoch, first)
            plan = None  # the finished epoch's plan goes before the next is packed
            plan = self._planned(epoch, first)

    def state_at_step(self, step: int) -> dict:
        """A checkpoint's data position: the step, and an epoch that starts at or before it (`epoch`, `epoch_start`)
        so a resume packs that epoch's plan instead of every plan before it (plans are recomputed from the seed)."""
        epoch, first = self._known(step)
        return {"step": step, "seed": self.seed, "epoch": epoch, "epoch_start": first, "plan": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Take a checkpoint's epoch start when it was planned from these clips and settings; otherwise (an older
        checkpoint, another seed or dataset) walks count the epochs from the first, to the same batches."""
        if state.get("plan") == self.fingerprint and "epoch" in state:
            self._remember(int(state["epoch"]), int(state["epoch_start"]))
