"""The loop's throughput and data-wait figures against wall-clock time measured around it."""

import time

import pytest
import torch

from hf_audio_trainer.loop import LoopSettings, train
from hf_audio_trainer.optim import build_optimizer, build_scheduler

STEPS = 20


def batches(delay):
    x = torch.ones(4, 2)
    while True:
        if delay:  # a slow loader; sleep(0) would give the CPU away, which on a loaded machine is a real wait
            time.sleep(delay)
        yield {"x": x, "num_items": 40, "num_samples": 4, "audio_seconds": 8.0}


def slow_loss(model, batch):
    time.sleep(0.01)  # a step that costs real time, so fixed overheads are small next to it
    return model(batch["x"]).pow(2).sum(), {}


def run(accelerator, delay):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model.parameters(), "adamw", lr=0.01)
    scheduler = build_scheduler(optimizer, "constant", 0, STEPS)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    settings = LoopSettings(max_steps=STEPS, logging_steps=STEPS, flops_per_item=1e6, peak_flops=1e12)
    start = time.perf_counter()
    metrics = train(accelerator, model, optimizer, scheduler, batches(delay), slow_loss, settings)
    return metrics, time.perf_counter() - start


def test_throughput_agrees_with_the_wall_clock_and_data_wait_shows_a_slow_loader(accelerator):
    metrics, wall = run(accelerator, delay=0.0)
    for key, total in (("samples", 4 * STEPS), ("tokens", 40 * STEPS), ("audio_seconds", 8.0 * STEPS)):
        implied = total / metrics[f"train/{key}_per_second"]  # the seconds the loop says it took
        assert implied == pytest.approx(wall, rel=0.05), key
    assert metrics["train/step_time"] == pytest.approx(wall / STEPS, rel=0.05)
    assert metrics["train/mfu"] == pytest.approx(1e6 * metrics["train/tokens_per_second"] / 1e12)
    assert metrics["train/data_wait_fraction"] < 0.1
    assert metrics["system/rss_gb"] > 0.05  # this Python process holds torch: far more than 50 MB
    slowed, _ = run(accelerator, delay=0.02)
    assert slowed["train/data_wait_fraction"] > 0.5  # 20 ms of loading per 10 ms step
