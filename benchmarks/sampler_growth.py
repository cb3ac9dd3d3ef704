"""Batches by duration at a late epoch: the memory the sampler holds and the time a resume takes to its first batch.

    python benchmarks/sampler_growth.py [--clips 20000] [--epochs 40]

Walks a `TokenBudgetSampler` through `--epochs` epochs one micro-batch at a time, as a run does, and reports the
memory it holds (tracemalloc, allocations since it was built) after epoch 1 and after the last; then resumes three
steps into the last epoch from the checkpoint's sampler state (a new sampler, the state loaded, its first
micro-batch) and reports the time and the peak memory that took. Run it in two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from hf_audio_trainer.batching import TokenBudgetSampler

CODEBOOKS, WINDOW = 4, 1500  # EnCodec-32k-like codes: 4 codebooks, 30 s windows at 50 frames/s


def build(lengths: np.ndarray) -> TokenBudgetSampler:
    # 8 full windows per micro-batch, 4 micro-batches per step, one process
    return TokenBudgetSampler(lengths, 8 * WINDOW * CODEBOOKS, CODEBOOKS, 4, segment_frames=WINDOW, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    lengths = np.random.default_rng(0).integers(25, 3 * WINDOW, args.clips)  # 0.5 s to 90 s tracks

    sampler = build(lengths)
    stream = sampler.micro_batches()
    tracemalloc.start()
    started, held, step_of = time.perf_counter(), {}, {}
    micro_batches = 0
    for epoch in (1, args.epochs):
        while next(stream)[2] < epoch:
            micro_batches += 1
        step_of[epoch] = micro_batches // 4  # the first micro-batch of `epoch` opens this step
        micro_batches += 1
        held[epoch] = tracemalloc.get_traced_memory()[0]
    walk = time.perf_counter() - started
    tracemalloc.stop()
    step = step_of[args.epochs] + 3
    state = sampler.state_at_step(step)

    tracemalloc.start()
    started = time.perf_counter()
    resumed = build(lengths)
    resumed.load_state_dict(state)
    first = next(resumed.micro_batches(step))
    resume = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first[0] == next(sampler.micro_batches(step))[0]

    mib = 2**20
    print(
        f"{args.clips:,} clips, {sampler.steps_per_epoch} steps an epoch; walked {args.epochs} epochs in {walk:.1f} s"
    )
    print(f"memory held after epoch 1: {held[1] / mib:.2f} MiB, after epoch {args.epochs}: "
          f"{held[args.epochs] / mib:.2f} MiB")  # fmt: skip
    print(f"resume at step {step} (epoch {args.epochs}): {resume:.2f} s to the first micro-batch, peak "
          f"{peak / mib:.2f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
