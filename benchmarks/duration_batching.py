"""Batches by duration vs fixed-size batches on variable-length clips: padding and useful tokens per second.

Random codes (a tiny MusicGen decoder, `--codebooks` codebooks of 256) for `--num_clips` clips whose lengths are
drawn log-uniform (or uniform) in [`--min_frames`, `--max_frames`] at 50 frames/s, the skewed spread of real speech
and music sets, capped so the tiny model trains fast on CPU. Two ways to batch them, one optimizer step per batch:

- fixed: `--batch_size` clips per batch in a random order (each padded to its longest clip);
- duration: `TokenBudgetSampler` micro-batches of at most `max_tokens = batch_size x typical_len x codebooks`.

typical_len is the mean padded length of the fixed batches (their mean longest clip, measured on a whole epoch of
them), so both modes compute about the same padded tokens per step (the same mean activation memory, printed), and
no budgeted micro-batch exceeds the fixed mode's worst one (batch_size x the longest clip), counted as the sampler
counts (frames x codebooks; collated, every clip also carries the delay pattern's K - 1 extra positions).

Batches are collated before timing; forward + backward + AdamW step are timed for `--steps` steps per mode on copies
of the same initial model, the modes interleaved step by step (order swapped every step) so changes in machine load
hit both alike, `--repeats` times with data-order seeds 0, 1, ... Padding is the share of batch positions past each
clip's end; useful tokens are target tokens (neither padding nor the delay pattern's K - 1 empty slots per clip).
The claim is the median over repeats of the ratio of useful tokens per second, duration / fixed; target >= 1.3x.

    python benchmarks/duration_batching.py [--steps 25] [--batch_size 16] [--repeats 3] [--distribution loguniform]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch

from hf_audio_trainer.batching import TokenBudgetSampler
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.families.musicgen import build_decoder, lm_loss

FRAME_RATE = 50.0
CODEBOOK_SIZE = 256


def clip_lengths(num_clips: int, low: int, high: int, distribution: str) -> np.ndarray:
    """Frames per clip: log-uniform (many short clips, a long tail) or uniform in [low, high]."""
    rng = np.random.default_rng(0)
    if distribution == "loguniform":
        return np.exp(rng.uniform(np.log(low), np.log(high + 1), num_clips)).astype(np.int64).clip(low, high)
    return rng.integers(low, high + 1, num_clips)


def fixed_batches(num_clips: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of random-order batches of `batch_size` clips (the last, incomplete one dropped)."""
    order = np.random.default_rng([seed, 1]).permutation(num_clips).tolist()
    return [order[i : i + batch_size] for i in range(0, num_clips - batch_size + 1, batch_size)]


def budget_batches(lengths: np.ndarray, max_tokens: int, codebooks: int, steps: int, seed: int) -> list[list[int]]:
    sampler = TokenBudgetSampler(lengths, max_tokens, tokens_per_frame=codebooks, micro_batches_per_step=1, seed=seed)
    batches = sampler.micro_batches(0)
    return [next(batches)[0] for _ in range(steps)]


def train_times(model: torch.nn.Module, runs: dict[str, list[dict]]) -> dict[str, float]:
    """Seconds of forward + backward + AdamW step per run (a fresh copy of `model` each), the runs' steps interleaved
    (step i of each run in turn, the order swapped every step) so a change in machine load hits every run alike."""
    states = {}
    for name in runs:
        copy_ = copy.deepcopy(model).train()
        states[name] = copy_, torch.optim.AdamW([p for p in copy_.parameters() if p.requires_grad], lr=1e-3)
    seconds = dict.fromkeys(runs, 0.0)
    for i in range(min(len(batches) for batches in runs.values())):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            net, optimizer = states[name]
            start = time.perf_counter()
            loss_sum, _ = lm_loss(net, runs[name][i])
            (loss_sum / runs[name][i]["num_items"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_clips", type=int, default=4000)
    parser.add_argument("--min_frames", type=int, default=5)
    parser.add_argument("--max_frames", type=int, default=250)
    parser.add_argument("--distribution", choices=["loguniform", "uniform"], default="loguniform")
    parser.add_argument("--codebooks", type=int, default=4)
    parser.add_argument("--model_size", default="tiny")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    k = args.codebooks
    lengths = clip_lengths(args.num_clips, args.min_frames, args.max_frames, args.distribution)
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, CODEBOOK_SIZE, (k, int(n))).tolist() for n in lengths]
    model = build_decoder(None, args.model_size, k, CODEBOOK_SIZE, args.max_frames + k + 8, dropout=0.0)
    collate = CodesCollator(k, model.config.pad_token_id, model.config.bos_token_id, frame_rate=FRAME_RATE)
    typical = round(statistics.mean(int(lengths[b].max()) for b in fixed_batches(len(lengths), args.batch_size, 0)))
    max_tokens = args.batch_size * typical * k

    def make(mode: str, seed: int) -> list[dict]:
        if mode == "fixed":
            rows = fixed_batches(len(lengths), args.batch_size, seed)[: args.steps]
        else:
            rows = budget_batches(lengths, max_tokens, k, args.steps, seed)
        return [collate([{"codes": codes[i]} for i in indices]) for indices in rows]

    modes = ["fixed", "duration"]
    train_times(model, {m: make(m, 99)[:3] for m in modes})  # warm-up: allocator, kernels
    tps: dict[str, list[float]] = {m: [] for m in modes}
    batches_seen: dict[str, list[dict]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        runs = {m: make(m, repeat) for m in (modes if repeat % 2 == 0 else modes[::-1])}
        seconds = train_times(model, runs)
        for mode, batches in runs.items():
            tps[mode].append(sum(b["num_items"] for b in batches) / seconds[mode])
            batches_seen[mode].extend(batches)
        print(f"repeat {repeat}: " + ", ".join(f"{m} {seconds[m]:.1f} s, {tps[m][-1]:,.0f} tok/s" for m in modes))
    ratios = [d / f for d, f in zip(tps["duration"], tps["fixed"], strict=True)]
    print(
        f"\n{args.num_clips} clips of {args.min_frames}-{args.max_frames} frames ({args.distribution}, mean "
        f"{lengths.mean():.0f}, median {np.median(lengths):.0f}); {args.steps} steps x {args.repeats} repeats, model "
        f"{args.model_size}, {k} codebooks; fixed batch {args.batch_size} clips; budget {max_tokens} tokens "
        f"= {args.batch_size} x {typical} frames (fixed batches' mean longest clip) x {k}\n"
    )
    print(
        "| batching | clips / micro-batch | padded tokens / step | padding | not targets (padding + delay slots) "
        "| useful tokens / step | useful tokens / s (median) | vs fixed (median of repeats) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        seen = batches_seen[mode]
        slots = sum(b["labels"].numel() for b in seen)
        padding = 1 - sum(int(b["attention_mask"].sum()) for b in seen) / sum(b["attention_mask"].numel() for b in seen)
        items = sum(b["num_items"] for b in seen)
        vs = f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})" if mode != "fixed" else "1"
        print(
            f"| {mode} | {statistics.mean(b['num_samples'] for b in seen):.1f} | {slots / len(seen):,.0f} | "
            f"{padding:.1%} | {1 - items / slots:.1%} | {items / len(seen):,.0f} | {statistics.median(tps[mode]):,.0f} "
            f"| {vs} |"
        )
    print(f"\ntarget >= 1.30x: {'met' if statistics.median(ratios) >= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
