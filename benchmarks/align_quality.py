"""Does alignment make the model's own generations better? The preference scorer on finetuned vs aligned samples.

Loads two run folders (default: outputs/finetune and outputs/align, i.e. the README's three-command pipeline),
continues the same held-out prompts (validation prompts of the embedded synthetic pairs, a seed the align run did
not train on) with one sampled continuation each, seeded identically for both models, and prints the mean
`tonal_clarity` score (minus spectral flatness: higher is cleaner, more pitched audio) of each and their
difference, plus the align run's final held-out reward accuracy and margin from its metrics.

    python benchmarks/align_quality.py [--before outputs/finetune] [--after outputs/align] [--prompts 32]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from transformers import MusicgenForCausalLM

from hf_audio_trainer.alignment import mean_generation_score
from hf_audio_trainer.codecs import load_audio_tokenizer
from hf_audio_trainer.data.preferences import make_synthetic_preferences
from hf_audio_trainer.trackers import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="outputs/finetune")
    parser.add_argument("--after", default="outputs/align")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    held_out = make_synthetic_preferences(num_pairs=args.prompts, seed=12345, validation_fraction=0.5)
    prompts = [np.asarray(row["array"], dtype=np.float32) for split in held_out.values() for row in split["prompt"]]
    scores = {}
    for name in (args.before, args.after):
        model = MusicgenForCausalLM.from_pretrained(name)
        tokenizer = load_audio_tokenizer(Path(name) / "tokenizer")
        per_seed = [mean_generation_score(model, tokenizer, prompts, seconds=args.seconds, seed=s) for s in args.seeds]
        scores[name] = (float(np.mean(per_seed)), float(np.std(per_seed)))
        print(f"{name}: tonal_clarity {scores[name][0]:.4f} +- {scores[name][1]:.4f} over seeds {args.seeds}")
    diff = scores[args.after][0] - scores[args.before][0]
    print(f"aligned - finetuned: {diff:+.4f} ({'better' if diff > 0 else 'not better'})")
    evals = [m for m in read_metrics(args.after) if "eval/rewards/accuracies" in m]
    if evals:
        first, last = evals[0], evals[-1]
        print(
            f"held-out rewards/accuracies {first['eval/rewards/accuracies']:.3f} (step {first['step']}) -> "
            f"{last['eval/rewards/accuracies']:.3f} (step {last['step']}); margins "
            f"{first['eval/rewards/margins']:.3f} -> {last['eval/rewards/margins']:.3f}"
        )


if __name__ == "__main__":
    main()
