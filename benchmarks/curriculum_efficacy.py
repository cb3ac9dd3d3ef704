"""Does curriculum learning help? Steps to reach a validation loss with random order vs linear and root pacing.

Runs the real pretrain recipe on the embedded synthetic data (tiny model, one shared tokenizer) for each pacing
and seed, measures validation loss every `--eval_steps`, and prints one table: the first evaluated step at which
validation loss is at or below `--target_loss`, per run, and the mean ratio against `none` (random order).

    python benchmarks/curriculum_efficacy.py [--steps 200] [--seeds 0 1 2] [--target_loss 3.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from hf_audio_trainer import pretrain
from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.trackers import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def steps_to_target(output_dir: Path, target: float) -> int | None:
    for m in read_metrics(output_dir):
        if "eval/loss" in m and m["eval/loss"] <= target:
            return m["step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--curriculum_steps", type=int, default=100)
    parser.add_argument("--start_fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pacings", nargs="+", default=["none", "linear", "root"])
    parser.add_argument("--target_loss", type=float, default=3.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        waves = [a["array"] for a in make_synthetic_dataset(num_clips=2000)["train"].select(range(500))["audio"]]
        MelKMeansTokenizer.fit(waves, sample_rate=16000, seed=0).save_pretrained(root / "tokenizer")
        results: dict[str, list[int | None]] = {}
        finals: dict[str, list[float]] = {}
        for pacing in args.pacings:
            for seed in args.seeds:
                out = root / f"{pacing}-{seed}"
                result = pretrain(
                    {
                        "output_dir": str(out), "tokenizer": str(root / "tokenizer"), "seed": seed,
                        "max_steps": args.steps, "eval_steps": args.eval_steps, "save_steps": 10 * args.steps,
                        "logging_steps": args.eval_steps, "report_to": "none", "warmup_steps": 20,
                        "learning_rate": 3e-3, "curriculum": pacing, "curriculum_steps": args.curriculum_steps,
                        "curriculum_start_fraction": args.start_fraction,
                    }
                )  # fmt: skip
                results.setdefault(pacing, []).append(steps_to_target(out, args.target_loss))
                finals.setdefault(pacing, []).append(result.metrics["eval/loss"])
                curve = " ".join(f"{m['step']}:{m['eval/loss']:.2f}" for m in read_metrics(out) if "eval/loss" in m)
                print(
                    f"{pacing} seed {seed}: steps to {args.target_loss} = {results[pacing][-1]}; curve {curve}",
                    flush=True,
                )
    print(
        f"\nsteps to validation loss <= {args.target_loss} ({args.steps} steps, eval every {args.eval_steps}, "
        f"curriculum over {args.curriculum_steps} steps from {args.start_fraction:.0%})"
    )
    print(f"{'pacing':8s} | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | vs none | final val loss")
    baseline = _mean(results.get("none", []))
    for pacing, steps in results.items():
        mean = _mean(steps)
        ratio = f"{mean / baseline:.2f}" if mean and baseline else "n/a"
        cells = " | ".join(f"{s if s is not None else '>' + str(args.steps):>6}" for s in steps)
        print(f"{pacing:8s} | {cells} | {mean or float('nan'):.0f} | {ratio} | {statistics.mean(finals[pacing]):.3f}")


def _mean(values: list[int | None]) -> float | None:
    return statistics.mean(values) if values and all(v is not None for v in values) else None


if __name__ == "__main__":
    main()
