"""Time to the first optimizer step after resuming at step 1,000 against resuming at step 10.

The data order is a pure function of (seed, epoch, position), so resuming late must cost no more than resuming
early (a dataloader that replays to its position takes 100x longer). One run trains a micro model to step 1,000
saving every 10 steps; then two fresh runs resume from checkpoint-10 and checkpoint-1000 and each takes one step.
Time to first step = from calling `pretrain` to the step's line in metrics.jsonl (data preparation included, and
identical for both).

    python benchmarks/resume_time.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from hf_audio_trainer import pretrain
from hf_audio_trainer.trackers import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEPS = 1000


def settings(output_dir: Path, **overrides) -> dict:
    return {
        "output_dir": str(output_dir),
        "synthetic_num_clips": 64,
        "num_codebooks": 2,
        "codebook_size": 32,
        "model_size": "micro",
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "eval_steps": 0,
        "eval_on_start": False,
        "logging_steps": 1,
        "dropout": 0.0,
        **overrides,
    }


def time_to_first_step(checkpoint: Path, output_dir: Path, tokenizer: Path) -> float:
    step = int(checkpoint.name.split("-")[1])
    start = time.time()
    pretrain(
        settings(
            output_dir,
            resume_from_checkpoint=str(checkpoint),
            tokenizer=str(tokenizer),
            max_steps=step + 1,
            save_steps=10_000,
        )
    )
    first = next(m for m in read_metrics(output_dir) if m["step"] == step + 1 and "train/loss" in m)
    return first["time"] - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"  # a micro model: 100 checkpoints take a few MB
        pretrain(settings(base, max_steps=STEPS, save_steps=10, save_total_limit=None))
        tokenizer = base / "tokenizer"
        early = time_to_first_step(base / "checkpoint-10", root / "early", tokenizer)
        late = time_to_first_step(base / f"checkpoint-{STEPS}", root / "late", tokenizer)
        print(f"time to first step: resume at 10 = {early:.2f} s, at {STEPS} = {late:.2f} s, ratio {late / early:.3f}")


if __name__ == "__main__":
    main()
