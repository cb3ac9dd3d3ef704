"""Does a sequence-length curriculum reach a validation loss sooner than fixed-length training, same total tokens?

Runs the real pretrain recipe in-process on the embedded synthetic data (clips of 0.5-3 s, one shared tokenizer and
tokenization cache) twice per seed, both batching by tokens (`--max_tokens_per_batch` = `--batch_clips` x a full
window x codebooks, so every step holds the same token budget and equal steps mean equal tokens, checked from the
metrics):

- fixed: every step trains on windows of `--segment_seconds` (the whole clip, for clips shorter than that);
- curriculum: `--curriculum linear --curriculum_segments`: windows grow linearly from `--start_fraction` of the full
  window to all of it over `--curriculum_steps`, then stay full.

Validation loss is measured every `--eval_steps` on each validation clip's full-length middle window (the same for
both). The target is, per seed, the fixed run's final validation loss x (1 + `--margin`) (or `--target_loss`); the
step at which a run reaches it is interpolated linearly between the two evaluations around the crossing, and the
time to it is the training time up to that step, summed from the logged step times (evaluation and saving are not
counted). The two runs of a seed train at the same time, in two processes of one thread each, so whatever else
loads the machine slows both alike (on a shared 2-core machine one run's step time swings 20x with other work).

    python benchmarks/segment_curriculum.py [--steps 300] [--curriculum_steps 150] [--seeds 0 1 2] [--model_size tiny]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from hf_audio_trainer import pretrain
from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.trackers import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CODEBOOKS, FRAME_RATE = 4, 50.0


def train_run(flags: dict) -> None:
    """One pretrain run, in a worker process of its own."""
    torch.set_num_threads(1)  # the two runs of a pair share the cores
    pretrain(flags)


def run_summary(output_dir: Path) -> dict:
    """Evaluated (step, val loss, training seconds so far) points, and the run's target tokens and mean step time."""
    rows = read_metrics(output_dir)
    seconds_at, tokens, seconds, last = {0: 0.0}, 0.0, 0.0, 0
    for m in rows:
        if "train/step_time" in m:  # a log line covers the steps since the previous one
            window = m["train/step_time"] * (m["step"] - last)
            tokens += m["train/tokens_per_second"] * window
            seconds += window
            seconds_at[m["step"]], last = seconds, m["step"]
    evals = [(m["step"], m["eval/loss"], seconds_at[m["step"]]) for m in rows if "eval/loss" in m]
    return {"evals": evals, "tokens": tokens, "step_time": seconds / max(last, 1), "final": evals[-1][1]}


def reach(evals: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, training seconds) at which validation loss first reaches `target`, interpolated between evaluations."""
    for (s0, l0, t0), (s1, l1, t1) in itertools.pairwise(evals):
        if l1 <= target:
            f = (l0 - target) / (l0 - l1) if l0 > target else 0.0
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--curriculum_steps", type=int, default=150)
    parser.add_argument("--start_fraction", type=float, default=0.25)
    parser.add_argument("--segment_seconds", type=float, default=3.0)
    parser.add_argument("--batch_clips", type=int, default=8, help="token budget = this many full windows")
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--target_loss", type=float, default=None, help="a fixed target instead of the margin's")
    args = parser.parse_args()
    max_tokens = args.batch_clips * round(args.segment_seconds * FRAME_RATE) * CODEBOOKS
    curriculum = {
        "curriculum": "linear", "curriculum_segments": True, "curriculum_steps": args.curriculum_steps,
        "curriculum_start_fraction": args.start_fraction,
    }  # fmt: skip
    summaries: dict[str, list[dict]] = {"fixed": [], "curriculum": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        waves = [a["array"] for a in make_synthetic_dataset(num_clips=300, seed=0)["train"]["audio"]]
        MelKMeansTokenizer.fit(
            waves, sample_rate=16000, num_codebooks=CODEBOOKS, codebook_size=256, seed=0
        ).save_pretrained(root / "tokenizer")
        flags = {
            "report_to": "none", "model_size": args.model_size, "synthetic_num_clips": 2000,
            "max_steps": args.steps, "eval_steps": args.eval_steps, "logging_steps": args.eval_steps,
            "save_steps": 100 * args.steps, "tokenizer": str(root / "tokenizer"),
            "preprocessing_cache_dir": str(root / "cache"), "segment_seconds": args.segment_seconds,
            "max_tokens_per_batch": max_tokens, "learning_rate": args.learning_rate, "warmup_steps": 20,
        }  # fmt: skip
        for seed in args.seeds:
            # The validation split depends on the seed: tokenize each seed's split into the shared cache first, so
            # the two runs of a pair do not race to do it, and both start from the same weights (a cold cache draws
            # from torch's global RNG between seeding and the model's init).
            warm_up = {"output_dir": str(root / f"warm-up-{seed}"), "seed": seed, "max_steps": 2, "warmup_steps": 0}
            pretrain({**flags, **warm_up, "eval_steps": 0})
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
            for seed in args.seeds:
                runs = {
                    mode: {**flags, **extra, "seed": seed, "output_dir": str(root / f"{mode}-{seed}")}
                    for mode, extra in (("fixed", {}), ("curriculum", curriculum))
                }
                for job in [pool.submit(train_run, run) for run in runs.values()]:
                    job.result()
                for mode, run in runs.items():
                    summaries[mode].append(run_summary(Path(run["output_dir"])))
                    curve = " ".join(f"{s}:{loss:.3f}" for s, loss, _ in summaries[mode][-1]["evals"])
                    print(f"{mode} seed {seed}: val loss {curve}", flush=True)
    print(
        f"\nmodel {args.model_size}, {args.steps} steps of <= {max_tokens} tokens ({args.batch_clips} x "
        f"{args.segment_seconds:g} s windows x {CODEBOOKS} codebooks); curriculum linear over {args.curriculum_steps} "
        f"steps from {args.start_fraction:.0%} of the window; target = "
        + (f"{args.target_loss}" if args.target_loss else f"fixed run's final val loss x {1 + args.margin:g}")
        + "; times are training seconds (no eval)\n"
    )
    print(
        "| seed | target | fixed: steps / s to target | curriculum: steps / s to target | steps ratio curr/fixed "
        "| time ratio curr/fixed | final val loss fixed / curr | s / step fixed / curr | target tokens curr/fixed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for seed, fixed, curr in zip(args.seeds, summaries["fixed"], summaries["curriculum"], strict=True):
        target = args.target_loss or fixed["final"] * (1 + args.margin)
        hits = [reach(run["evals"], target) for run in (fixed, curr)]
        cells = [f"{h[0]:.0f} / {h[1]:.0f}" if h else f"> {args.steps} / not reached" for h in hits]
        ratio = hits[1][1] / hits[0][1] if all(hits) else None
        steps = f"{hits[1][0] / hits[0][0]:.2f}" if all(hits) else "n/a"
        ratios.append(ratio)
        if fixed["evals"][0][1] != curr["evals"][0][1]:
            print(f"note: seed {seed}'s runs start from different weights (step-0 val loss differs)")
        print(
            f"| {seed} | {target:.3f} | {cells[0]} | {cells[1]} | {steps} | {f'{ratio:.2f}' if ratio else 'n/a'} "
            f"| {fixed['final']:.3f} / {curr['final']:.3f} | {fixed['step_time']:.2f} / {curr['step_time']:.2f} "
            f"| {curr['tokens'] / fixed['tokens']:.3f} |"
        )
    reached = [r for r in ratios if r is not None]
    print(
        f"\ncurriculum reached the target in {len(reached)}/{len(ratios)} seeds"
        + (
            f"; median time ratio curriculum/fixed {statistics.median(reached):.2f} (< 1: curriculum faster)"
            if reached
            else ""
        )
    )


if __name__ == "__main__":
    main()
