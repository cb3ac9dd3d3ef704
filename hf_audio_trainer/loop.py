"""The one training loop: one step per iteration (by default accumulate, item-weighted loss, clip, step), then log /
eval / save on visible lines. A family that trains otherwise (the GAN's two networks) passes its own step."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from hf_audio_trainer.ema import EMA, is_dtensor
from hf_audio_trainer.errors import check
from hf_audio_trainer.system import SystemMonitor

MIXED_PRECISION = ("no", "fp16", "bf16")


class Batch(TypedDict):
    """What the loop reads of a micro-batch; the family's model inputs (tensors) sit beside these keys.

    `num_items` is what the loss is a sum over (target tokens, pairs, clips), counted on the host by the collator,
    so the loop weights the loss without a device sync; `sample_stats` (optional) are per-sample sums the loop logs
    as means (the curriculum's `mean_difficulty`). An evaluation batch with `padding` set only keeps this process's
    forwards in step with the others': it is run and counts nothing.
    """

    num_items: float
    num_samples: int
    audio_seconds: float


LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepOutput:
    """What one optimizer step did: whether the main network's update was applied, and sums for the log window.

    `sums` maps a logged name to (a device tensor summed over this process's micro-batches, the name of its count);
    `counts` holds those counts for this process (items, clips ...): the window logs sum / count over all ranks.
    """

    stepped: bool
    sums: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


class StepFn(Protocol):
    """Optimizer step `step + 1` over its micro-batches; `items` is their item count over all processes."""

    def __call__(self, step: int, micro_batches: list[dict], items: float) -> StepOutput: ...

    def log(self, logged: dict[str, float]) -> dict[str, str]:
        """Add the step's own figures (grad norms, learning rates ...) to a log line; returns the progress postfix."""
        ...


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision and seed."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow a new run in an output_dir that holds another run's checkpoints; that run's checkpoints, "
            "best/ and final model are deleted first (the folder's other files stay)."
        },
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; -1: use num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs to run when max_steps is -1."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Clips per device per micro-batch."})
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Batch by duration: a micro-batch holds as many clips (of similar length) as fit this many "
            "padded tokens (clips x (longest + delay) frames x codebooks, as collated); replaces "
            "per_device_train_batch_size. Unset: fixed-size batches."
        },
    )
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Clips per device per eval batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; unset: whatever `accelerate launch` was configured with."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and dropout."})
    max_consecutive_skips: int = field(
        default=10, metadata={"help": "Stop after this many optimizer steps in a row with a non-finite loss."}
    )

    def __post_init__(self) -> None:
        check(self.max_steps == -1 or self.max_steps > 0, f"max_steps={self.max_steps}: must be > 0, or -1")
        check(self.num_train_epochs > 0, f"num_train_epochs={self.num_train_epochs}: must be > 0")
        check(
            self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 1,
            f"max_tokens_per_batch={self.max_tokens_per_batch}: must be >= 1",
        )
        check(self.max_consecutive_skips >= 0, f"max_consecutive_skips={self.max_consecutive_skips}: must be >= 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be >= 1")
        check(
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision={self.mixed_precision!r}: choose one of {MIXED_PRECISION} or none (accelerate's setting)",
        )


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
    """What happened since the last log line: the steps' sums on the device, batch counts and times on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.monitor = SystemMonitor(device)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # kept on the device: no sync per micro-batch
        self.sum_counts: dict[str, str] = {}
        self.counts: dict[str, float] = {}
        self.sample_stats: dict[str, float] = {}
        self.items = self.samples = self.audio_seconds = self.data_wait = self.paused = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def add_batch(self, batch: dict) -> None:
        self.items += batch["num_items"]
        self.samples += batch["num_samples"]
        self.audio_seconds += batch["audio_seconds"]
        for name, value in batch.get("sample_stats", {}).items():
            self.sample_stats[name] = self.sample_stats.get(name, 0.0) + value

    def add_step(self, output: StepOutput) -> None:
        for name, (value, count) in output.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.sum_counts[name] = count
        for name, value in output.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + value

    def metrics(self, accelerator: Accelerator, settings: LoopSettings) -> dict[str, float]:
        """Means over the window and all ranks (one reduce); throughput over training time only."""
        names, count_names, stat_names = sorted(self.sums), sorted(self.counts), sorted(self.sample_stats)
        host = [self.items, self.samples, self.audio_seconds, *(self.counts[n] for n in count_names)]
        host += [self.sample_stats[n] for n in stat_names]
        packed = [torch.tensor(host, dtype=torch.float64).to(self.device)]
        packed += [self.sums[n].reshape(1).double() for n in names]
        values = accelerator.reduce(torch.cat(packed)).tolist()  # the same order on every rank
        items, samples, audio = values[:3]
        counts = dict(zip(count_names, values[3 : 3 + len(count_names)], strict=True))
        stats = values[3 + len(count_names) : 3 + len(count_names) + len(stat_names)]
        sums = values[3 + len(count_names) + len(stat_names) :]
        elapsed = time.perf_counter() - self.start - self.paused  # evaluation and saving are not training time
        logged = {
            f"train/{name}": total / max(counts[self.sum_counts[name]], 1.0)
            for name, total in zip(names, sums, strict=True)
            if counts[self.sum_counts[name]]
        }
        logged.update({
            "train/samples_per_second": samples / elapsed,
            "train/tokens_per_second": items / elapsed,
            "train/audio_seconds_per_second": audio / elapsed,
            "train/step_time": elapsed / max(self.steps, 1),
            "train/data_wait_fraction": self.data_wait / elapsed,
            **self.monitor.read(),
        })  # fmt: skip
        if settings.flops_per_item and settings.peak_flops:  # model FLOPs utilisation of all the processes' devices
            peak = settings.peak_flops * accelerator.num_processes
            logged["train/mfu"] = settings.flops_per_item * items / elapsed / peak
        for name, total in zip(stat_names, stats, strict=True):  # per sample
            logged[f"train/{name}"] = total / max(samples, 1.0)
        return logged


class DefaultStep:
    """One network: accumulate the item-weighted loss over the micro-batches, clip, skip a non-finite update, step.

    An optimizer that needs more than the gradient (a second-order one: Sophia's Hessian estimate) offers
    `prepare_step(loss_closure)`; it gets a closure that computes the mean loss of the step's first micro-batch
    with a graph, and decides itself whether to use it.
    """

    def __init__(self, accelerator: Accelerator, model, optimizer, scheduler, loss_fn: LossFn, max_grad_norm: float):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn, self.max_grad_norm = loss_fn, max_grad_norm
        self.skipped = 0
        self.grad_norm: torch.Tensor | None = None
        self.prepare_step = getattr(getattr(optimizer, "optimizer", optimizer), "prepare_step", None)

    def __call__(self, step: int, micro_batches: list[dict], items: float) -> StepOutput:
        acc, model = self.accelerator, self.model
        accum, world = len(micro_batches), acc.num_processes
        total = torch.zeros((), device=acc.device)
        extras: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            with acc.accumulate(model):
                loss_sum, stats = self.loss_fn(model, to_device(batch, acc.device))
                # accelerator.backward divides by accum and DDP averages over ranks; undo both so the gradient is
                # d(sum of losses) / (items of the whole step)
                acc.backward(loss_sum * (accum * world) / items)
            total += loss_sum.detach().float()
            for name, value in stats.items():
                extras[name] = extras.get(name, 0.0) + value.detach().float()
        # the pre-clip norm is what tells you about stability; inf max norm measures without clipping
        grad_norm = acc.clip_grad_norm_(model.parameters(), self.max_grad_norm or float("inf"))
        if is_dtensor(grad_norm):  # FSDP2 reports a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.grad_norm = torch.as_tensor(grad_norm, device=acc.device)  # DeepSpeed's engine reports a float
        # A non-finite loss makes a non-finite norm: skip the update (parameters, optimizer state and schedule
        # untouched, cf. pytorch #67590). This is the step's one host sync. Under fp16 the loss scaler already skips
        # such steps, and must see them to lower its scale.
        finite = acc.scaler is not None or bool(torch.isfinite(self.grad_norm))
        if finite:
            if self.prepare_step is not None:
                self.prepare_step(lambda: self.first_loss(micro_batches[0]))
            self.optimizer.step()
        stepped = finite and not acc.optimizer_step_was_skipped
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += not stepped
        counted = float(sum(b["num_items"] for b in micro_batches))
        sums = {"loss": (total, "items"), **{name: (value, "items") for name, value in extras.items()}}
        return StepOutput(stepped, sums, {"items": counted})

    def first_loss(self, batch: dict) -> torch.Tensor:
        """The mean loss of one micro-batch with a graph that can be differentiated twice, averaged by the caller."""
        # fused attention kernels have no double backward; the unwrapped model keeps DDP's gradient hooks out of it
        with sdpa_kernel(SDPBackend.MATH):
            loss_sum, _ = self.loss_fn(
                self.accelerator.unwrap_model(self.model), to_device(batch, self.accelerator.device)
            )
        return loss_sum / batch["num_items"]

    def log(self, logged: dict[str, float]) -> dict[str, str]:
        logged.update({
            "train/learning_rate": self.scheduler.get_last_lr()[0],
            "train/grad_norm": self.grad_norm.item(),
            "train/skipped_steps": self.skipped,
        })  # fmt: skip
        if self.accelerator.scaler is not None:
            logged["train/loss_scale"] = self.accelerator.scaler.get_scale()
        return {"loss": f"{logged['train/loss']:.4f}", "lr": f"{logged['train/learning_rate']:.2e}"}


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
    step_fn: StepFn | None = None,
) -> dict[str, float]:
    """Run optimizer steps start_step+1 .. max_steps; return the last logged train and eval metrics.

    `loss_fn(model, batch)` returns the SUM of per-item losses (tokens, pairs ...) and each batch carries its item
    count `num_items`, so a step's loss is sum(losses) / sum(items) over all its micro-batches and all ranks: micro-
    batch x accumulation x processes then gives the same update as one big batch, whatever the padding.
    `step_fn` replaces the default step (`DefaultStep` of model, optimizer, scheduler and loss_fn); `model` is the
    network the EMA follows. A first SIGTERM/SIGINT ends the run after the current step with a checkpoint
    (`Preempted`).
    """
    s, accum, world = settings, settings.gradient_accumulation_steps, accelerator.num_processes
    step_fn = step_fn or DefaultStep(accelerator, model, optimizer, scheduler, loss_fn, s.max_grad_norm)
    metrics: dict[str, float] = {}
    step = start_step
    if evaluate is not None and s.eval_on_start and step == 0:
        metrics.update(evaluate(0))
        accelerator.log(metrics, step=0)
    progress = tqdm(total=s.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    window = Window(accelerator.device)
    consecutive = 0
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
            output = step_fn(step, micro_batches, items)
            for batch in micro_batches:
                window.add_batch(batch)
            window.add_step(output)
            stop_requested = bool(stop)  # on the device under several processes: read after the step's own sync
            step += 1  # the batch is consumed either way, so the data position stays a function of the step
            window.steps += 1
            consecutive = 0 if output.stepped else consecutive + 1
            if consecutive > s.max_consecutive_skips:
                raise NonFiniteError(
                    f"{consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient norm"
                )
            if ema is not None and output.stepped:
                ema.update(accelerator.unwrap_model(model), step)
            progress.update(1)

            if step % s.logging_steps == 0 or step == s.max_steps:
                logged = window.metrics(accelerator, s)
                postfix = step_fn.log(logged)
                accelerator.log(logged, step=step)
                metrics.update(logged)
                progress.set_postfix(postfix)
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


@torch.no_grad()
def evaluate_metrics(
    accelerator: Accelerator, model: torch.nn.Module, batches: Callable[[], Iterator[dict]], loss_fn: LossFn
) -> dict[str, float]:
    """Item-weighted loss (`loss`) and the loss function's other per-item sums over all ranks' validation batches.

    Every rank must bring as many batches (`data.codes.eval_batches` pads the short ones): a forward may be a
    collective. A `padding` batch's forward runs and its sums are left out, but its names count, so a rank without
    validation rows reduces the same sums as the others; the loss function must return the same names every batch.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=device)}
    items = 0.0
    for batch in batches():
        loss_sum, extras = loss_fn(model, to_device(batch, device))
        for name, value in {"loss": loss_sum, **extras}.items():
            total = sums.setdefault(name, torch.zeros((), device=device))
            if not batch.get("padding"):  # left out, not multiplied by 0: a NaN or inf there would survive that
                sums[name] = total + value.float()
        items += batch["num_items"]
    model.train(was_training)
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([*(sums[n] for n in names), torch.tensor(items, device=device)]))
    *totals, items = totals.tolist()
    return {name: total / max(items, 1.0) for name, total in zip(names, totals, strict=True)}


def evaluate_loss(
    accelerator: Accelerator, model: torch.nn.Module, batches: Callable[[], Iterator[dict]], loss_fn: LossFn
) -> float:
    """Item-weighted loss over all of this rank's validation batches, summed over ranks."""
    return evaluate_metrics(accelerator, model, batches, loss_fn)["loss"]


def evaluate_conditioned(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: Callable[[], Iterator[dict]],
    null_batches: Callable[[], Iterator[dict]],
    loss: LossFn,
    loss_fn: LossFn | None,
    sample_metrics: Callable[[torch.nn.Module, int], dict[str, float]],
) -> Callable[[int, str, bool], dict[str, float]]:
    """evaluate(step, suffix, sample) of a conditioned model: `loss_fn`'s metrics on `batches` when given (align: the
    DPO objective's on held-out pairs), else `eval/loss` of `loss` on `batches` and `eval/loss_uncond` on
    `null_batches` (the null condition); on the `sample` pass, `sample_metrics(model, step)` too."""

    def evaluate_weights(step: int, suffix: str, sample: bool) -> dict[str, float]:
        if loss_fn is not None:
            metrics = evaluate_metrics(accelerator, model, batches, loss_fn)
            results = {f"eval/{k}{suffix}": v for k, v in metrics.items()}
        else:
            results = {
                f"eval/loss{suffix}": evaluate_loss(accelerator, model, batches, loss),
                f"eval/loss_uncond{suffix}": evaluate_loss(accelerator, model, null_batches, loss),
            }
        if sample:
            results.update(sample_metrics(model, step))
        return results

    return evaluate_weights
