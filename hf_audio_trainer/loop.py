"""The one training loop: accumulate, token-weighted loss, clip, step; then log / eval / save on visible lines."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from hf_audio_trainer.ema import EMA
from hf_audio_trainer.optim import Sophia, hutchinson_hessian
from hf_audio_trainer.system import SystemMonitor

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


@dataclass
class LoopSettings:
    max_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    eval_on_start: bool = False
    max_consecutive_skips: int = 10
    flops_per_item: float = 0.0  # training FLOPs per loss item (token), for MFU
    peak_flops: float = 0.0  # one device's peak FLOP/s; 0: MFU is not logged


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Iterator[dict],
    loss_fn: LossFn,
    settings: LoopSettings,
    start_step: int = 0,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    save: Callable[[int], None] | None = None,
    ema: EMA | None = None,
) -> dict[str, float]:
    """Run optimizer steps start_step+1 .. max_steps; return the last logged train and eval metrics.

    `loss_fn(model, batch)` returns the SUM of per-item losses (tokens, pairs ...) and each batch carries its item
    count `num_items`, so a step's loss is sum(losses) / sum(items) over all its micro-batches and all ranks: micro-
    batch x accumulation x processes then gives the same update as one big batch, whatever the padding.
    """
    s, accum, world = settings, settings.gradient_accumulation_steps, accelerator.num_processes
    metrics: dict[str, float] = {}
    step = start_step
    if evaluate is not None and s.eval_on_start and step == 0:
        metrics.update(evaluate(0))
        accelerator.log(metrics, step=0)
    progress = tqdm(total=s.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    window_loss = torch.zeros((), device=accelerator.device)  # loss sum since the last log, kept on device
    window_extras: dict[str, torch.Tensor] = {}  # the loss function's other per-item sums (e.g. DPO rewards)
    window_items = samples = audio_seconds = difficulty = data_wait = 0.0
    window_steps = 0
    monitor = SystemMonitor(accelerator.device)
    grad_norm = torch.zeros((), device=accelerator.device)
    skipped = consecutive = 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    sophia = inner if isinstance(inner, Sophia) else None
    tic = time.perf_counter()
    model.train()
    while step < s.max_steps:
        waiting = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]
        data_wait += time.perf_counter() - waiting  # a loader that cannot keep up shows here
        window_steps += 1
        items = float(sum(b["num_items"] for b in micro_batches))  # counted on the host by the collator
        if world > 1:  # one collective per step; it stays on the device, nothing waits for it on the host
            items = accelerator.reduce(torch.tensor(items, device=accelerator.device), "sum")
        for batch in micro_batches:
            with accelerator.accumulate(model):
                loss_sum, extras = loss_fn(model, to_device(batch, accelerator.device))
                # accelerator.backward divides by accum and DDP averages over ranks; undo both so the gradient
                # is d(sum of losses) / (items of the whole step)
                accelerator.backward(loss_sum * (accum * world) / items)
            window_loss += loss_sum.detach().float()
            for name, value in extras.items():
                window_extras[name] = window_extras.get(name, 0.0) + value.detach().float()
            window_items += batch["num_items"]
            samples += batch["num_samples"]
            audio_seconds += batch["audio_seconds"]
            difficulty += batch.get("difficulty_sum", 0.0)
        # the pre-clip norm is what tells you about stability; inf max norm measures without clipping
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm or float("inf"))
        # A non-finite loss makes a non-finite norm: skip the update (parameters, optimizer state and schedule
        # untouched, cf. pytorch #67590). This is the loop's one host sync per optimizer step. Under fp16 the
        # loss scaler already skips such steps, and must see them to lower its scale.
        finite = accelerator.scaler is not None or bool(torch.isfinite(grad_norm))
        if finite:
            if sophia is not None and sophia.hessian_due:
                sophia.next_hessian = estimate_hessian(accelerator, model, loss_fn, micro_batches[0], sophia)
            optimizer.step()
        stepped = finite and not accelerator.optimizer_step_was_skipped
        if stepped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1  # the batch is consumed either way, so the data position stays a function of the step
        skipped, consecutive = (skipped, 0) if stepped else (skipped + 1, consecutive + 1)
        if consecutive > s.max_consecutive_skips:
            raise NonFiniteError(
                f"{consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient norm"
            )
        if ema is not None and stepped:
            ema.update(accelerator.unwrap_model(model), step)
        progress.update(1)

        if step % s.logging_steps == 0 or step == s.max_steps:
            host = [window_items, samples, audio_seconds, difficulty]
            host = torch.tensor(host, device=accelerator.device, dtype=torch.float64)
            names = sorted(window_extras)  # the same order on every rank
            extras_sums = [window_extras[n].reshape(1).double() for n in names]
            totals = accelerator.reduce(torch.cat([window_loss[None].double(), host, *extras_sums]))
            elapsed = time.perf_counter() - tic
            loss_sum_total, items_total, samples_total, audio_total, difficulty_total, *extras_total = totals.tolist()
            logged = {
                "train/loss": loss_sum_total / max(items_total, 1.0),
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm.item(),
                "train/samples_per_second": samples_total / elapsed,
                "train/tokens_per_second": items_total / elapsed,
                "train/audio_seconds_per_second": audio_total / elapsed,
                "train/step_time": elapsed / window_steps,
                "train/data_wait_fraction": data_wait / elapsed,
                **monitor.read(),
            }
            if s.flops_per_item and s.peak_flops:  # model FLOPs utilisation of all the processes' devices
                logged["train/mfu"] = s.flops_per_item * items_total / elapsed / (s.peak_flops * world)
            if "difficulty_sum" in micro_batches[-1]:
                logged["train/mean_difficulty"] = difficulty_total / max(samples_total, 1.0)
            for name, total in zip(names, extras_total, strict=True):  # per item over the window, all ranks
                logged[f"train/{name}"] = total / max(items_total, 1.0)
            logged["train/skipped_steps"] = skipped
            if accelerator.scaler is not None:
                logged["train/loss_scale"] = accelerator.scaler.get_scale()
            accelerator.log(logged, step=step)
            metrics.update(logged)
            progress.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/learning_rate']:.2e}")
            window_loss.zero_()
            window_extras.clear()
            window_items = samples = audio_seconds = difficulty = data_wait = 0.0
            window_steps = 0
            tic = time.perf_counter()
        paused = time.perf_counter()  # evaluation and saving are not training time: the throughput window skips them
        if evaluate is not None and s.eval_steps and (step % s.eval_steps == 0 or step == s.max_steps):
            evaluated = evaluate(step)
            accelerator.log(evaluated, step=step)
            metrics.update(evaluated)
        if save is not None and s.save_steps and step % s.save_steps == 0:
            save(step)
        tic += time.perf_counter() - paused
    progress.close()
    return metrics


def estimate_hessian(
    accelerator: Accelerator, model: torch.nn.Module, loss_fn: LossFn, batch: dict, optimizer: torch.optim.Optimizer
) -> list[torch.Tensor]:
    """Sophia's extra pass: a Hutchinson estimate of diag(H) of one micro-batch's mean loss, averaged over ranks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # fused attention kernels have no double backward; the unwrapped model keeps DDP's gradient hooks out of it
    with sdpa_kernel(SDPBackend.MATH):
        loss_sum, _ = loss_fn(accelerator.unwrap_model(model), to_device(batch, accelerator.device))
        hessian = hutchinson_hessian(loss_sum / batch["num_items"], params)
    return accelerator.reduce(hessian, "mean") if accelerator.num_processes > 1 else hessian


@torch.no_grad()
def evaluate_metrics(
    accelerator: Accelerator, model: torch.nn.Module, batches: Callable[[], Iterator[dict]], loss_fn: LossFn
) -> dict[str, float]:
    """Item-weighted loss (`loss`) and the loss function's other per-item sums over all ranks' validation batches."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=accelerator.device)}
    items = 0.0
    for batch in batches():
        loss_sum, extras = loss_fn(model, to_device(batch, accelerator.device))
        for name, value in {"loss": loss_sum, **extras}.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        items += batch["num_items"]
    model.train(was_training)
    names = sorted(sums)
    device = accelerator.device
    totals = accelerator.reduce(torch.stack([*(sums[n] for n in names), torch.tensor(items, device=device)]))
    *totals, items = totals.tolist()
    return {name: total / max(items, 1.0) for name, total in zip(names, totals, strict=True)}


def evaluate_loss(
    accelerator: Accelerator, model: torch.nn.Module, batches: Callable[[], Iterator[dict]], loss_fn: LossFn
) -> float:
    """Item-weighted loss over all of this rank's validation batches, summed over ranks."""
    return evaluate_metrics(accelerator, model, batches, loss_fn)["loss"]
