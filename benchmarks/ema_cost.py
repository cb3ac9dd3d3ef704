"""Cost of an EMA update against a training step of the same model, measured in one run.

    python benchmarks/ema_cost.py [--model_size tiny] [--steps 30]

Prints the EMA update time as a fraction of a training step (forward, backward, AdamW) for the EMA on the
model's device and offloaded to the CPU. Target: <= 3%.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.ema import EMA
from hf_audio_trainer.families.musicgen import build_decoder, lm_loss
from hf_audio_trainer.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clips = [{"codes": rng.integers(0, 256, (4, int(rng.integers(25, 150)))).tolist()} for _ in range(args.batch_size)]
    batch = CodesCollator(4, 256, 256, 50.0)(clips)
    model = build_decoder(None, args.model_size, 4, 256, 200, dropout=0.0)
    optimizer = build_optimizer(model, "adamw", lr=1e-4)
    emas = {"on device": EMA(model, decay=0.999), "offloaded to CPU": EMA(model, decay=0.999, device="cpu")}
    step_times, update_times = [], {name: [] for name in emas}
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss, _ = lm_loss(model, batch)
        (loss / batch["num_items"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        for name, ema in emas.items():
            start = time.perf_counter()
            ema.update(model, step)
            update_times[name].append(time.perf_counter() - start)
    step_time = float(np.median(step_times))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.model_size} ({params:,} trainable parameters), batch {args.batch_size}, median of {args.steps}")
    for name, times in update_times.items():
        print(f"  EMA update {name:17s}: {np.median(times) / step_time:.2%} of a training step")


if __name__ == "__main__":
    main()
