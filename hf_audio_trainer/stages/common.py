"""What every stage does around its own model and data: the run length, the loop's settings, and the run's end
(final export, the validation change, the Hub push), as one `RunResult`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.checkpoint import Checkpointer
from hf_audio_trainer.config import StageConfig
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.ema import EMA
from hf_audio_trainer.loop import LoopSettings, NonFiniteError, Preempted, train
from hf_audio_trainer.system import peak_flops
from hf_audio_trainer.trackers import read_metrics


def fit_run_length(cfg: StageConfig, accelerator: Accelerator, max_steps: int) -> None:
    """Once the run's length is known (from --max_steps or the epochs): settings counted in steps must fit in it."""
    for note in cfg.fit_to_run(max_steps):
        accelerator.print(note)


def shuffled_sampler(cfg: StageConfig, accelerator: Accelerator, num_rows: int) -> tuple[int, CurriculumSampler, int]:
    """A seeded shuffle of all rows, one global order split by rank (no curriculum): the global batch, the sampler
    and the run's step count (from --max_steps, or --num_train_epochs), with the warm-up fitted to it."""
    t = cfg.training
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    sampler = CurriculumSampler(
        [0.0] * num_rows, global_batch, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        seed=t.seed,
    )  # fmt: skip
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)
    fit_run_length(cfg, accelerator, max_steps)
    return global_batch, sampler, max_steps


@dataclass
class RunResult:
    """What a stage produced."""

    output_dir: str
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False  # stopped by SIGTERM/SIGINT after a checkpoint: resume with --resume_from_checkpoint latest


def train_and_finish(
    cfg: StageConfig,
    accelerator: Accelerator,
    checkpointer: Checkpointer,
    settings: LoopSettings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Iterator[dict],
    loss_fn: Callable,
    start_step: int,
    evaluate: Callable[[int], dict[str, float]],
    ema: EMA | None,
) -> RunResult:
    """The training loop, then the final export (`finish`)."""

    def run_loop() -> dict[str, float]:
        return train(
            accelerator, model, optimizer, scheduler, batches, loss_fn, settings, start_step, evaluate,
            checkpointer.save, ema,
        )  # fmt: skip

    advice = "a lower --learning_rate, a smaller --max_grad_norm or --mixed_precision bf16 instead of fp16"
    return run_and_finish(cfg, accelerator, checkpointer, settings.max_steps, run_loop, advice)


def run_and_finish(
    cfg: StageConfig,
    accelerator: Accelerator,
    checkpointer: Checkpointer,
    max_steps: int,
    run_loop: Callable[[], dict[str, float]],
    advice: str,
) -> RunResult:
    """Run a training loop, then the final export (`finish`).

    A diverged run's error points at the last good checkpoint and says what to change (`advice`); a run stopped by a
    signal returns after its checkpoint (exit status 0), without exporting a final model.
    """
    out = Path(cfg.training.output_dir)
    try:
        metrics = run_loop()
    except NonFiniteError as err:
        good = ckpt.list_checkpoints(out)
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise NonFiniteError(f"{err}: training diverged; {where}. Resume from it with {advice}") from err
    except Preempted as stop:
        accelerator.print(
            f"Stopped by a signal after step {stop.step}; its checkpoint is written. Continue with "
            "--resume_from_checkpoint latest"
        )
        return RunResult(str(out), stop.step, stop.metrics, preempted=True)
    finish(cfg, accelerator, checkpointer, metrics)
    return RunResult(str(out), max_steps, metrics)


def loop_settings(cfg: StageConfig, accelerator: Accelerator, max_steps: int, flops_per_item: float = 0.0):
    """The loop's settings from the config; MFU is logged when the FLOPs per item and the device's peak are known."""
    return LoopSettings(
        max_steps=max_steps,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=cfg.logging.logging_steps,
        eval_steps=cfg.logging.eval_steps,
        save_steps=cfg.checkpoint.save_steps,
        eval_on_start=cfg.logging.eval_on_start,
        max_consecutive_skips=cfg.training.max_consecutive_skips,
        flops_per_item=flops_per_item,
        peak_flops=peak_flops(accelerator.device, cfg.logging.peak_tflops),
    )


def finish(cfg: StageConfig, accelerator: Accelerator, checkpointer: Checkpointer, metrics: dict[str, float]) -> None:
    """Export the final model (and `ema/`), report the validation change, push with a model card, wait for uploads."""
    out, export = Path(cfg.training.output_dir), checkpointer.export
    if checkpointer.ema is not None:
        export(out / "ema", True)
    export(out, cfg.ema.final_model == "ema")
    evals = [(m["step"], m["eval/loss"]) for m in read_metrics(out) if "eval/loss" in m]
    if len(evals) > 1:
        (s0, first), (s1, last) = evals[0], evals[-1]
        accelerator.print(
            f"validation loss {first:.4f} at step {s0} -> {last:.4f} at step {s1} "
            f"({100 * (last - first) / first:+.1f}%)"
        )
    checkpointer.push_model(metrics)
    if checkpointer.pusher is not None:
        for failure in checkpointer.pusher.wait():
            accelerator.print(f"Hub upload failed (the local files are complete): {failure}")
