"""The one training loop: accumulate, token-weighted loss, clip, step; then log / eval / save on visible lines."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from hf_audio_trainer.ema import EMA, is_dtensor
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


class Preempted(Exception):  # noqa: N818 (a stop, not an error)
    """SIGTERM or SIGINT arrived: the loop finished its step, saved a checkpoint and stopped."""

    def __init__(self, step: int, metrics: dict[str, float]):
        super().__init__(f"stopped by a signal after step {step}")
        self.step, self.metrics = step, metrics


SIGNAL_ECHO = 2.0  # seconds


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict]:
    """While training: the first SIGTERM/SIGINT asks the loop to stop after its step; a second one exits at once.

    Spot instances and SLURM send SIGTERM before they kill; Ctrl-C sends SIGINT. A repeat within `SIGNAL_ECHO`
    seconds is the same request arriving twice, not a second one: torchrun (`accelerate launch`) forwards the
    SIGTERM or Ctrl-C it received to workers that SLURM or the terminal already signalled. Handlers can only be set
    in the main thread; elsewhere (a notebook's worker thread) signals keep their default behaviour.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first = {}

    def handle(signum, frame):
        if flag["stop"] and time.monotonic() - first["time"] > SIGNAL_ECHO:
            raise SystemExit(128 + signum)  # a second request: no more waiting
        flag["stop"] = True
        first.setdefault("time", time.monotonic())

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Window:
    """What happened since the last log line: loss and item sums on the device, counts and times on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.monitor = SystemMonitor(device)
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # kept on the device: no sync per micro-batch
        self.extras: dict[str, torch.Tensor] = {}  # the loss function's other per-item sums (e.g. DPO rewards)
        self.items = self.samples = self.audio_seconds = self.difficulty = self.data_wait = self.paused = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, batch: dict, loss_sum: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        self.loss += loss_sum.detach().float()
        for name, value in extras.items():
            self.extras[name] = self.extras.get(name, 0.0) + value.detach().float()
        self.items += batch["num_items"]
        self.samples += batch["num_samples"]
        self.audio_seconds += batch["audio_seconds"]
        self.difficulty += batch.get("difficulty_sum", 0.0)

    def metrics(self, accelerator: Accelerator, settings: LoopSettings, has_difficulty: bool) -> dict[str, float]:
        """Averages over the window and all ranks (one reduce); throughput over training time only."""
        names = sorted(self.extras)  # the same order on every rank
        host = torch.tensor([self.items, self.samples, self.audio_seconds, self.difficulty], dtype=torch.float64)
        sums = [self.loss[None].double(), host.to(self.device), *(self.extras[n].reshape(1).double() for n in names)]
        loss, items, samples, audio, difficulty, *extras = accelerator.reduce(torch.cat(sums)).tolist()
        elapsed = time.perf_counter() - self.start - self.paused  # evaluation and saving are not training time
        logged = {
            "train/loss": loss / max(items, 1.0),
            "train/samples_per_second": samples / elapsed,
            "train/tokens_per_second": items / elapsed,
            "train/audio_seconds_per_second": audio / elapsed,
            "train/step_time": elapsed / self.steps,
            "train/data_wait_fraction": self.data_wait / elapsed,
            **self.monitor.read(),
        }
        if settings.flops_per_item and settings.peak_flops:  # model FLOPs utilisation of all the processes' devices
            peak = settings.peak_flops * accelerator.num_processes
            logged["train/mfu"] = settings.flops_per_item * items / elapsed / peak
        if has_difficulty:
            logged["train/mean_difficulty"] = difficulty / max(samples, 1.0)
        for name, total in zip(names, extras, strict=True):  # per item
            logged[f"train/{name}"] = total / max(items, 1.0)
        return logged


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
    A first SIGTERM/SIGINT ends the run after the current step with a checkpoint (`Preempted`).
    """
    s, accum, world = settings, settings.gradient_accumulation_steps, accelerator.num_processes
    metrics: dict[str, float] = {}
    step = start_step
    if evaluate is not None and s.eval_on_start and step == 0:
        metrics.update(evaluate(0))
        accelerator.log(metrics, step=0)
    progress = tqdm(total=s.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    window = Window(accelerator.device)
    skipped = consecutive = 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    sophia = inner if isinstance(inner, Sophia) else None
    model.train()
    # the bar is closed on any exit, so an error's message starts on a line of its own
    with stop_on_signals() as signals, contextlib.closing(progress):
        while step < s.max_steps:
            waiting = time.perf_counter()
            micro_batches = [next(batches) for _ in range(accum)]
            window.data_wait += time.perf_counter() - waiting  # a loader that cannot keep up shows here
            items = float(sum(b["num_items"] for b in micro_batches))  # counted on the host by the collator
            stop = float(signals["stop"])  # a signal may reach only some ranks: they agree through the reduce
            if world > 1:  # one collective per step; it stays on the device, nothing waits for it on the host
                items, stop = accelerator.reduce(torch.tensor([items, stop], device=accelerator.device), "sum")
            for batch in micro_batches:
                with accelerator.accumulate(model):
                    loss_sum, extras = loss_fn(model, to_device(batch, accelerator.device))
                    # accelerator.backward divides by accum and DDP averages over ranks; undo both so the gradient
                    # is d(sum of losses) / (items of the whole step)
                    accelerator.backward(loss_sum * (accum * world) / items)
                window.add(batch, loss_sum, extras)
            # the pre-clip norm is what tells you about stability; inf max norm measures without clipping
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm or float("inf"))
            if is_dtensor(grad_norm):  # FSDP2 reports a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = torch.as_tensor(grad_norm, device=accelerator.device)  # DeepSpeed's engine reports a float
            # A non-finite loss makes a non-finite norm: skip the update (parameters, optimizer state and schedule
            # untouched, cf. pytorch #67590). This is the loop's one host sync per optimizer step. Under fp16 the
            # loss scaler already skips such steps, and must see them to lower its scale.
            checks = torch.stack([torch.isfinite(grad_norm).float(), torch.as_tensor(stop, device=grad_norm.device)])
            finite_host, stop_requested = checks.tolist()
            finite = accelerator.scaler is not None or bool(finite_host)
            if finite:
                if sophia is not None and sophia.hessian_due:
                    sophia.next_hessian = estimate_hessian(accelerator, model, loss_fn, micro_batches[0], sophia)
                optimizer.step()
            stepped = finite and not accelerator.optimizer_step_was_skipped
            if stepped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1  # the batch is consumed either way, so the data position stays a function of the step
            window.steps += 1
            skipped, consecutive = (skipped, 0) if stepped else (skipped + 1, consecutive + 1)
            if consecutive > s.max_consecutive_skips:
                raise NonFiniteError(
                    f"{consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient norm"
                )
            if ema is not None and stepped:
                ema.update(accelerator.unwrap_model(model), step)
            progress.update(1)

            if step % s.logging_steps == 0 or step == s.max_steps:
                logged = window.metrics(accelerator, s, "difficulty_sum" in micro_batches[-1])
                logged.update({
                    "train/learning_rate": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm.item(),
                    "train/skipped_steps": skipped,
                })  # fmt: skip
                if accelerator.scaler is not None:
                    logged["train/loss_scale"] = accelerator.scaler.get_scale()
                accelerator.log(logged, step=step)
                metrics.update(logged)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/learning_rate']:.2e}")
                window.reset()
            paused = time.perf_counter()
            if evaluate is not None and s.eval_steps and (step % s.eval_steps == 0 or step == s.max_steps):
                evaluated = evaluate(step)
                accelerator.log(evaluated, step=step)
                metrics.update(evaluated)
            saved = save is not None and s.save_steps and step % s.save_steps == 0
            if saved or (save is not None and stop_requested):  # SIGTERM/SIGINT: this step is saved, then we stop
                save(step)
            window.paused += time.perf_counter() - paused
            if stop_requested:
                raise Preempted(step, metrics)
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
