"""From audio to code sequences (tokenizing a dataset once) and from code sequences to padded model batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from datasets import Dataset

from hf_audio_trainer.data.segments import take_window, window_start

_MAIN_PID = os.getpid()  # datasets forks its num_proc workers after this module is imported


def one_thread_in_workers() -> None:
    """Call first in a `Dataset.map` function that runs torch ops, so num_proc workers do not hang."""
    # A forked num_proc worker inherits the parent's OpenMP pool in a broken state and hangs at its first parallel
    # torch op once the parent has run one; with one thread torch runs ops inline. The workers share the cores anyway.
    if os.getpid() != _MAIN_PID:
        torch.set_num_threads(1)


def delay_pattern(codes: np.ndarray, pad_id: int) -> np.ndarray:
    """MusicGen's delay pattern: codebook k is shifted right by k frames, [K, F] -> [K, F + K - 1]."""
    num_codebooks, num_frames = codes.shape
    delayed = np.full((num_codebooks, num_frames + num_codebooks - 1), pad_id, dtype=np.int64)
    for k in range(num_codebooks):
        delayed[k, k : k + num_frames] = codes[k]
    return delayed


class CodesCollator:
    """Pads delayed code sequences into a batch for MusicgenForCausalLM.

    input_ids are the delayed codes shifted right behind a BOS token; labels are the delayed codes with the delay
    padding and the batch padding set to -100, so every clip contributes exactly num_codebooks x frames targets.
    `num_items` (the target-token count) is computed here on the host, so the loop can weight the loss without a
    device sync. An example's `prompt_frames` (if given) are context only: their targets are masked too.
    """

    def __init__(self, num_codebooks: int, pad_id: int, bos_id: int, frame_rate: float):
        self.num_codebooks = num_codebooks
        self.frame_rate = frame_rate
        self.pad_id = pad_id
        self.bos_id = bos_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | int]:
        delayed = [delay_pattern(np.asarray(ex["codes"], dtype=np.int64), self.pad_id) for ex in examples]
        k, length = self.num_codebooks, max(d.shape[1] for d in delayed)
        input_ids = np.full((len(examples), k, length), self.pad_id, dtype=np.int64)
        labels = np.full((len(examples), k, length), -100, dtype=np.int64)
        attention_mask = np.zeros((len(examples), length), dtype=np.int64)
        for i, d in enumerate(delayed):
            n = d.shape[1]
            input_ids[i, :, 0] = self.bos_id
            input_ids[i, :, 1:n] = d[:, :-1]
            labels[i, :, :n] = np.where(d == self.pad_id, -100, d)
            for kk in range(k):  # codebook kk of frame t sits at position kk + t
                labels[i, kk, : kk + examples[i].get("prompt_frames", 0)] = -100
            attention_mask[i, :n] = 1
        frames = sum(len(ex["codes"][0]) - ex.get("prompt_frames", 0) for ex in examples)
        batch = {
            # MusicGen takes codebooks folded into the batch: row b * K + k is codebook k of clip b
            "input_ids": torch.from_numpy(input_ids.reshape(-1, length)),
            "labels": torch.from_numpy(labels.reshape(-1, length)),
            "attention_mask": torch.from_numpy(attention_mask),
            "num_items": frames * k,
            "num_samples": len(examples),
            "audio_seconds": frames / self.frame_rate,
        }
        # per-clip sums the loop logs as means: the windows' length (a sequence-length curriculum's footprint) and
        # the curriculum's, the difficulty trained on
        batch["sample_stats"] = {"mean_clip_seconds": sum(len(ex["codes"][0]) for ex in examples) / self.frame_rate}
        if "difficulty" in examples[0]:
            batch["sample_stats"]["mean_difficulty"] = float(sum(ex["difficulty"] for ex in examples))
        return batch


def batch_stream(
    dataset: Dataset,
    sampler,
    micro_batch_size: int,
    collate: Callable[[list[dict]], dict],
    start_step: int = 0,
    columns: list[str] | None = None,
    positions: bool = False,
    segment_frames: int | None = None,
    seed: int = 0,
) -> Iterator[dict]:
    """Endless micro-batches for this rank, starting right after optimizer step `start_step` (no replay).

    The sampler is a `CurriculumSampler` (micro-batches of `micro_batch_size` clips) or a `TokenBudgetSampler` (as many
    clips as fit its token budget, and a window length per step). `segment_frames`: each track is cut to a window
    of that many frames at a start drawn from (seed, epoch, row) (`data.segments`); None keeps whole tracks.
    `positions`: each example also carries its row and the epoch it is drawn in (`row`, `epoch`), for what must be
    a pure function of the data position (classifier-free guidance's condition dropout).
    """
    columns = columns or [c for c in ("codes", "difficulty") if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    plan = (
        sampler.micro_batches(start_step)
        if hasattr(sampler, "micro_batches")
        else _fixed_size(sampler, micro_batch_size, start_step, segment_frames)
    )
    for indices, frames, epoch in plan:
        picked = rows[indices]  # one read per micro-batch, column-wise
        per_row = zip(*(picked[c] for c in columns), strict=True)
        examples = [dict(zip(columns, values, strict=True)) for values in per_row]
        windowed = next((c for c in ("codes", "latents") if c in columns), None)
        if frames is not None and windowed is not None:
            for example, row in zip(examples, indices, strict=True):
                codes = example[windowed]
                start = window_start(seed, epoch, row, len(codes[0]), frames)
                example[windowed] = take_window(codes, start, frames)
                example["window_start"] = start
        if positions:
            for example, row in zip(examples, indices, strict=True):
                example.update(row=row, epoch=epoch)
        yield collate(examples)


def _fixed_size(sampler, micro_batch_size: int, start_step: int, segment_frames: int | None):
    """(indices, window frames, epoch) of a CurriculumSampler's micro-batches of `micro_batch_size` clips."""
    sampler.load_state_dict(sampler.state_at_step(start_step))
    while True:
        indices: list[int] = []
        for index in sampler:
            indices.append(index)
            if len(indices) == micro_batch_size:
                yield indices, segment_frames, sampler.epoch
                indices = []
        sampler.set_epoch(sampler.epoch + 1)


def eval_batches(
    dataset: Dataset,
    batch_size: int,
    collate: Callable[[list[dict]], dict],
    rank: int,
    world: int,
    columns: list[str] | None = None,
) -> Iterator[dict]:
    """This rank's share (every world-th row) of the validation set, in order, then padding batches up to as many
    batches as the rank with the most rows runs.

    Under FSDP2 and ZeRO-3 every forward gathers parameters from all ranks (under DDP the first one after training
    broadcasts buffers), so a rank that stopped early would leave the others waiting until the collective timeout.
    A padding batch is row 0 collated again (a real forward) with `padding` set and `num_items`, `num_samples`,
    `audio_seconds` 0: `loop.evaluate_metrics` runs it and counts nothing of it. A split the processes share evenly
    (and one process's) gets none.
    """
    rows = dataset.select_columns(columns or ["codes"])
    mine = list(range(rank, len(rows), world))
    for start in range(0, len(mine), batch_size):
        yield collate(_examples(rows, mine[start : start + batch_size]))
    most = -(-len(rows) // world)  # rank 0's share
    missing = -(-most // batch_size) - -(-len(mine) // batch_size)
    if missing:
        padding = {**collate(_examples(rows, [0])), "padding": True, "num_items": 0, "num_samples": 0}
        padding.update(audio_seconds=0.0, sample_stats={})
        for _ in range(missing):
            yield padding


def _examples(rows: Dataset, indices: list[int]) -> list[dict]:
    """The rows at `indices` as example dicts, in one column-wise read."""
    picked = rows[indices]
    return [dict(zip(picked, values, strict=True)) for values in zip(*picked.values(), strict=True)]
