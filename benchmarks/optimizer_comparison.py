"""Which optimizer trains the default pretrain best? Final validation loss (raw and EMA) after the same steps.

Runs the real pretrain recipe with its default config (recipes/configs/pretrain.yaml: tiny model, embedded
synthetic data, 300 steps, warm-up + cosine) once per optimizer with EMA on; the first run fits the tokenizer as
the default run does and the others reuse it (losses are only comparable under one tokenizer). It prints
one table: final validation loss of the raw and of the EMA weights, and wall time as a ratio to adamw's run in
this same invocation (Sophia pays for its Hessian pass there).

    python benchmarks/optimizer_comparison.py [--steps 300] [--optims adamw lion sophia adafactor muon]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hf_audio_trainer import pretrain
from hf_audio_trainer.config import config_from_dict, load_yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_YAML = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "pretrain.yaml"
# lr per optimizer: the default (tuned for AdamW) except Lion, whose sign updates want ~3x less lr and ~3x more
# weight decay (Chen et al. 2023); Sophia's lr is its per-coordinate step bound, like Adam's
OVERRIDES = {"lion": {"learning_rate": 1e-3, "weight_decay": 0.03}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optims", nargs="+", default=["adamw", "lion", "sophia", "adafactor", "muon"])
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--schedules", nargs="+", default=["cosine"], help="also try e.g. constant_with_warmup")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = None
        for schedule in args.schedules:
            for optim in args.optims:
                out = root / f"{optim}-{schedule}"
                overrides = {
                    "output_dir": str(out), "tokenizer": tokenizer, "max_steps": args.steps,
                    "optim": optim, "lr_scheduler_type": schedule, "ema": True, "ema_decay": args.ema_decay,
                    "report_to": "none", "save_steps": 10 * args.steps, **OVERRIDES.get(optim, {}),
                }  # fmt: skip
                # flatten the sectioned YAML first: its `optim:` section would otherwise be replaced by the flag
                defaults = {k: v for section in load_yaml(DEFAULT_YAML).values() for k, v in section.items()}
                config = config_from_dict({**defaults, **overrides})
                tic = time.perf_counter()
                metrics = pretrain(config).metrics
                tokenizer = tokenizer or str(out / "tokenizer")
                seconds = time.perf_counter() - tic
                rows.append((optim, schedule, metrics["eval/loss"], metrics["eval/loss_ema"], seconds))
                print(rows[-1], flush=True)
    base = {s: t for o, s, _, _, t in rows if o == "adamw"}
    print(f"\n{args.steps} steps of the default pretrain, EMA decay {args.ema_decay}\n")
    print("| optimizer | schedule | val loss (raw) | val loss (EMA) | EMA <= raw | time / adamw |")
    print("|---|---|---|---|---|---|")
    for optim, schedule, raw, ema, seconds in rows:
        ratio = f"{seconds / base[schedule]:.2f}" if schedule in base else "-"
        print(f"| {optim} | {schedule} | {raw:.3f} | {ema:.3f} | {'yes' if ema <= raw else 'no'} | {ratio} |")


if __name__ == "__main__":
    main()
