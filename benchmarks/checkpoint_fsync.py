"""Cost of making a checkpoint durable: save time with the fsyncs against without, measured in one run.

    python benchmarks/checkpoint_fsync.py [--model_size small] [--rounds 5] [--output_dir DIR]

A checkpoint's files and folders are fsynced before its rename and the output folder after it, so a host crash
right after a save cannot leave nothing to resume from (the rotation deletes older checkpoints next). This saves a
checkpoint of the model (weights, AdamW state, RNG) `rounds` times each way, alternating, with `os.fsync` made a
no-op for the runs without; before every save the whole page cache is written back (`os.sync`, untimed), so neither
way pays for the other's dirty pages. Prints the median times and their ratio. Put --output_dir on the disk your
checkpoints go to: a tmpfs makes fsync free.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from accelerate import Accelerator

from hf_audio_trainer.checkpoint import save_checkpoint
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.families.musicgen import build_decoder, lm_loss
from hf_audio_trainer.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clips = [{"codes": rng.integers(0, 256, (4, 50)).tolist()} for _ in range(2)]
    batch = CodesCollator(4, 256, 256, 50.0)(clips)
    accelerator = Accelerator()
    model = build_decoder(None, args.model_size, 4, 256, 200, dropout=0.0)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, "adamw", lr=1e-4))
    loss, _ = lm_loss(model, batch)
    loss.backward()
    optimizer.step()  # the optimizer's state exists, as in a real checkpoint

    times = {"with fsync": [], "without": []}
    with tempfile.TemporaryDirectory(dir=args.output_dir) as tmp:
        step = 0
        for i in range(args.rounds):
            ways = list(times) if i % 2 == 0 else list(reversed(times))  # neither way always goes first
            for way in ways:
                step += 1
                os.sync()
                with mock.patch("os.fsync", lambda fd: None) if way == "without" else contextlib.nullcontext():
                    start = time.perf_counter()
                    saved = save_checkpoint(accelerator, tmp, step, {"global_step": step}, save_total_limit=2)
                    times[way].append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file())
    with_fsync, without = (statistics.median(t) for t in times.values())
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model_size} ({params:,} parameters), checkpoint {size / 2**20:.0f} MiB, {args.rounds} rounds")
    print(f"  save with fsync {with_fsync:.3f} s, without {without:.3f} s: ratio {with_fsync / without:.2f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
