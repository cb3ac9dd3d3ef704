"""The loop skips non-finite steps without touching parameters, optimizer state or the schedule."""

import math

import pytest
import torch

from hf_audio_trainer.loop import LoopSettings, NonFiniteError, train
from hf_audio_trainer.optim import build_optimizer, build_scheduler


def batches():
    x = torch.linspace(-1, 1, 8).view(4, 2)
    while True:
        yield {"x": x, "num_items": 4, "num_samples": 4, "audio_seconds": 0.0}


def make_loss(bad_calls):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(batch["x"]).pow(2).sum()
        return (loss * float("nan") if calls["n"] in bad_calls else loss), {}

    return loss_fn


def setup(accelerator, max_steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model.parameters(), "adamw", lr=0.1)
    scheduler = build_scheduler(optimizer, "linear", 0, max_steps)
    return accelerator.prepare(model, optimizer, scheduler)


def test_a_nan_step_is_skipped_and_training_continues(accelerator):
    model, optimizer, scheduler = setup(accelerator, 5)
    snapshots = []

    def save(step):
        snapshots.append((step, [p.detach().clone() for p in model.parameters()], scheduler.scheduler.last_epoch))

    settings = LoopSettings(max_steps=5, logging_steps=5, save_steps=1)
    metrics = train(accelerator, model, optimizer, scheduler, batches(), make_loss({3}), settings, save=save)
    (_, before, sched_before), (_, after, sched_after) = snapshots[1], snapshots[2]  # steps 2 and 3
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # step 3 changed nothing
    assert sched_after == sched_before == 2  # and the schedule did not advance
    assert snapshots[3][2] == 3 and not torch.equal(snapshots[3][1][0], after[0])  # step 4 trained again
    assert metrics["train/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(metrics["train/loss"]) is False  # the logged window includes the NaN loss, visibly


def test_too_many_consecutive_skips_stop_the_run(accelerator):
    model, optimizer, scheduler = setup(accelerator, 10)
    settings = LoopSettings(max_steps=10, logging_steps=10, max_consecutive_skips=2)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        train(accelerator, model, optimizer, scheduler, batches(), make_loss({2, 3, 4}), settings)
