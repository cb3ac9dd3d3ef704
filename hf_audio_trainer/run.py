"""What every stage does around its own model and data: the accelerator's lifetime, the output folder, optimizer
and schedule, EMA, checkpoints with best tracking and resume, Hub pushes, and the final export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.config import StageConfig, sections
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.ema import EMA
from hf_audio_trainer.errors import ConfigError, ExistsError, LockedError
from hf_audio_trainer.hub import HubPusher, write_model_card
from hf_audio_trainer.lock import OutputLock
from hf_audio_trainer.loop import LoopSettings, NonFiniteError, Preempted, train
from hf_audio_trainer.optim import build_optimizer, build_scheduler, scale_lr
from hf_audio_trainer.system import peak_flops
from hf_audio_trainer.trackers import METRICS_FILE, JSONLinesTracker, read_metrics, truncate_metrics

EMA_FILE = "ema.safetensors"  # the EMA state inside a checkpoint


@contextlib.contextmanager
def stage_accelerator(cfg: StageConfig) -> Iterator[Accelerator]:
    """An Accelerator for one stage, holding the output folder's lock, both released afterwards (on every exit), so a
    notebook can run the next stage in the same process."""
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise ExistsError(f"--output_dir {out} is a file, not a folder; pass the path of a folder (new or existing)")
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        # DeepSpeed without a GPU (trying a ZeRO config on a laptop, CI): its default backend is NCCL, so say gloo.
        # The CPU flag must stay off: with it each rank believes it is alone and they race on the checkpoint.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=cfg.training.mixed_precision,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        log_with=[JSONLinesTracker(cfg.training.output_dir), *cfg.logging.trackers],
        project_dir=cfg.training.output_dir,
        # the schedule counts optimizer steps; accelerate would otherwise step it once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    lock = OutputLock(out)
    try:
        held_elsewhere = None
        if accelerator.is_main_process:  # one lock per output folder, however many processes and machines
            try:
                note = lock.acquire()
                if note is not None:
                    accelerator.print(f"{out}: {note}")
            except LockedError as err:
                held_elsewhere = str(err)
        if accelerator.num_processes > 1:  # every rank stops, with the same message
            held_elsewhere = broadcast_object(held_elsewhere)
        if held_elsewhere is not None:
            raise LockedError(held_elsewhere)
        yield accelerator
    finally:
        lock.release()
        accelerator.end_training()
        # accelerate keeps its settings in process-wide singletons; clear them so the next stage can use, say,
        # another precision (the process group, in PartialState, is kept)
        AcceleratorState._reset_state()
        GradientState._reset_state()


def prepare_output_dir(cfg: StageConfig, accelerator: Accelerator) -> Path | None:
    """Check the run can start here; returns the checkpoint to resume from, if any. Seeds everything."""
    t, out = cfg.training, Path(cfg.training.output_dir)
    for note in cfg.notes:  # defaults fitted to this run, warnings about values the user chose
        accelerator.print(note)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would accept this and silently train in fp32 (no autocast, no loss scaling on CPU)
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")
    resume = ckpt.resolve_resume(cfg.checkpoint.resume_from_checkpoint, out, warn=accelerator.print)
    ckpt.check_output_dir(out, resuming=resume is not None, overwrite=t.overwrite_output_dir)
    if accelerator.is_main_process:
        if resume is None:  # a new run: old checkpoints (allowed by --overwrite_output_dir) and logs go
            ckpt.remove_checkpoints(out)
            (out / METRICS_FILE).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_flat_dict(), indent=2))
    set_seed(t.seed)
    return resume


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


def build_optimization(
    cfg: StageConfig, accelerator: Accelerator, model: torch.nn.Module, global_batch: int, max_steps: int
):
    """Optimizer (with the linear scaling rule if asked) and schedule, from the config's optim section."""
    o = cfg.optim
    lr = o.learning_rate
    if o.scale_lr is not None:
        lr = scale_lr(o.learning_rate, o.base_batch_size, global_batch, o.scale_lr)
        accelerator.print(
            f"--scale_lr {o.scale_lr}: learning rate {o.learning_rate:g} tuned for a batch of {o.base_batch_size} "
            f"-> {lr:g} for the effective batch of {global_batch}"
        )
    optimizer = build_optimizer(
        model,
        o.optim,
        weight_decay=o.weight_decay,
        lr=lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        **({"rho": o.sophia_rho, "hessian_update_period": o.hessian_update_period} if o.optim == "sophia" else {}),
    )
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * max_steps)
    return optimizer, build_scheduler(optimizer, o.lr_scheduler_type, warmup, max_steps)


def check_tensor_parallel(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Tensor parallelism (`--parallelism_config_tp_size N`) needs a model with a transformers `tp_plan`."""
    parallel = accelerator.parallelism_config
    if parallel is None or parallel.tp_size <= 1:
        return
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    if not getattr(base, "_tp_plan", None) and not getattr(base.config, "base_model_tp_plan", None):
        raise ConfigError(
            f"tensor parallelism (tp_size={parallel.tp_size}) needs a model with a tensor-parallel plan, and "
            f"transformers has none for {type(base).__name__}: shard it with FSDP2 or ZeRO-3 instead "
            f"(accelerate_configs/fsdp2.yaml, deepspeed_zero3.yaml) and drop --parallelism_config_tp_size"
        )


def prepare(cfg: StageConfig, accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler):
    """`accelerator.prepare` for whichever strategy the launch config chose (DDP, FSDP2, DeepSpeed ZeRO)."""
    check_tensor_parallel(accelerator, model)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:
        # DeepSpeed's engine clips and sizes its buffers from its own config: our flags are the source of truth (no
        # dataloader goes through prepare, so accelerate cannot infer the micro-batch)
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.training.per_device_train_batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = cfg.optim.max_grad_norm
    if not accelerator.is_fsdp2:
        return accelerator.prepare(model, optimizer, scheduler)
    # accelerate's FSDP2 wrapping gives the input embeddings and the output head groups of their own, assuming one
    # module each; a multi-codebook model (MusicGen) has one per codebook in a ModuleList, which fully_shard refuses
    # ("containers that do not implement forward"). Hidden during prepare, they are sharded with the root group.
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    hidden = [
        name
        for name in ("get_input_embeddings", "get_output_embeddings")
        if isinstance(getattr(base, name, lambda: None)(), torch.nn.ModuleList)
    ]
    for name in hidden:
        setattr(base, name, lambda: None)
    try:
        return accelerator.prepare(model, optimizer, scheduler)
    finally:
        for name in hidden:
            delattr(base, name)


def prepare_frozen(cfg: StageConfig, accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (DPO's reference) placed for the strategy, without optimizer state or gradient sync.

    Under ZeRO-3 the weights were partitioned as they loaded (zero.Init), so the model needs a DeepSpeed engine of its
    own to gather them in forward (as TRL does); elsewhere it is a plain copy on each process's device.
    """
    model = model.requires_grad_(False).eval()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return model.to(accelerator.device)
    import deepspeed

    def concrete(value):  # accelerate's "auto" placeholders are only filled for the model it prepares
        if isinstance(value, dict):
            return {k: concrete(v) for k, v in value.items() if v != "auto"}
        return value

    config = concrete(plugin.deepspeed_config)
    config.pop("optimizer", None), config.pop("scheduler", None)
    micro, accumulation = cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * accelerator.num_processes
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeed's eval() returns None
    return engine


def build_ema(cfg: StageConfig, model: torch.nn.Module) -> EMA | None:
    e = cfg.ema
    if not e.ema:
        return None
    device = "cpu" if e.ema_offload else None
    return EMA(model, e.ema_decay, e.ema_update_every, e.ema_start_step, e.ema_warmup, device=device)


def start_pusher(cfg: StageConfig, accelerator: Accelerator) -> HubPusher | None:
    """Create the Hub repo before any training (a bad token or id fails now, not hours later)."""
    h = cfg.hub
    if not h.push_to_hub or not accelerator.is_main_process:
        return None
    return HubPusher(h.hub_model_id, token=h.hub_token, private=h.hub_private_repo, strategy=h.hub_strategy)


class Checkpointer:
    """Saves every `save_steps` (atomic, last-K rotation), keeps `best/` by the chosen metric, resumes exactly."""

    def __init__(
        self,
        cfg: StageConfig,
        accelerator: Accelerator,
        global_batch: int,
        max_steps: int,
        save_extras: Callable[[Path], None],
        extra_state: Callable[[int], dict] = lambda step: {},
        ema: EMA | None = None,
        pusher: HubPusher | None = None,
        export: Callable[[Path, bool], None] | None = None,
        card: Callable[[Path, dict], None] | None = None,
    ):
        self.cfg, self.accelerator, self.ema, self.pusher = cfg, accelerator, ema, pusher
        self.export, self.card = export, card  # export(folder, use_ema); card(folder, metrics)
        self.out = Path(cfg.training.output_dir)
        self.global_batch, self.max_steps = global_batch, max_steps
        self.save_extras, self.extra_state = save_extras, extra_state
        default = "eval/loss_ema" if ema is not None else "eval/loss"
        self.metric = cfg.checkpoint.metric_for_best_model or default
        self.best: dict = {}  # {"step", "value"} of the best checkpoint so far
        self.last_eval: dict = {}

    def resume(self, path: Path) -> int:
        """Load a checkpoint into the prepared objects; returns its step. Mismatches are refused before loading."""
        state = ckpt.verify_checkpoint(path)
        if state["global_batch_size"] != self.global_batch:
            raise ConfigError(
                f"{path} was trained with a global batch of {state['global_batch_size']}, this run has "
                f"{self.global_batch} (per-device batch x accumulation x processes); keep it the same to resume exactly"
            )
        here = (str(self.accelerator.distributed_type), self.accelerator.num_processes)
        there = (state.get("distributed_type", here[0]), state.get("num_processes", here[1]))
        sharded = ("DistributedType.FSDP", "DistributedType.DEEPSPEED")
        if there != here and (here[0] in sharded or there[0] in sharded):
            raise ConfigError(
                f"{path} holds shards from {there[1]} processes under {there[0]}; this run is {here[1]} under "
                f"{here[0]}. Resume with the same accelerate config and number of processes (or start a new run from "
                f"its exported model with --model_name_or_path)"
            )
        ema_file = path / self.ema_file()
        if self.ema is not None and not ema_file.is_file():
            raise ConfigError(f"{path} has no {ema_file.name}: it was trained without --ema; resume without it")
        try:
            ckpt.load_checkpoint(self.accelerator, path, state)
        except RuntimeError as err:
            if not any(text in str(err) for text in LOAD_MISMATCH):
                raise
            raise ConfigError(
                f"{path} does not fit this run's model: {settings_that_differ(self.cfg, state.get('config', {}))}; "
                "resume with the checkpoint's settings, or start a new run in another --output_dir"
            ) from None
        # the best so far, if one was recorded by this metric (a save before any evaluation records none)
        saved = state.get("best") or {}
        self.best = {"step": saved["step"], "value": saved["value"]} if "value" in saved else {}
        if saved.get("metric", self.metric) != self.metric:
            self.best = {}  # another metric now picks best/: its first evaluated save starts the comparison
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(ema_file)))
        if self.accelerator.is_main_process:
            truncate_metrics(self.out, state["global_step"])
        self.accelerator.print(f"Resumed from {path} at step {state['global_step']}")
        return state["global_step"]

    def ema_file(self) -> str:
        """One file of averages, or one per process when each averages its own shard (FSDP2, ZeRO-3)."""
        if self.ema is not None and self.ema.sharded:
            return f"ema-rank{self.accelerator.process_index}-of-{self.accelerator.num_processes}.safetensors"
        return EMA_FILE

    def record(self, step: int, results: dict[str, float]) -> None:
        self.last_eval = {**results, "step": step}

    def save(self, step: int) -> None:
        # best is judged where a save follows an evaluation of the same step
        value = self.last_eval.get(self.metric) if self.last_eval.get("step") == step else None
        greater, best = self.cfg.checkpoint.greater_is_better, self.best
        is_best = value is not None and (not best or (value > best["value"] if greater else value < best["value"]))
        if is_best:
            best.update(step=step, value=value)
        state = {
            "global_step": step,
            "global_batch_size": self.global_batch,
            "max_steps": self.max_steps,
            "num_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "config": self.cfg.to_flat_dict(),
            "best": {**best, "metric": self.metric},  # {"metric"} alone until an evaluated save
            **self.extra_state(step),
        }

        def extras(folder: Path) -> None:
            self.save_extras(folder)
            if self.ema is not None and not self.ema.sharded:
                save_file(self.ema.state_dict(), str(folder / EMA_FILE))

        def shards(folder: Path) -> None:
            save_file(self.ema.state_dict(), str(folder / self.ema_file()))

        sharded_ema = self.ema is not None and self.ema.sharded
        saved = ckpt.save_checkpoint(
            self.accelerator, self.out, step, state, extras, self.cfg.checkpoint.save_total_limit,
            rank_save=shards if sharded_ema else None,
        )  # fmt: skip
        if is_best:
            ckpt.copy_to_best(self.accelerator, self.out, saved)
        if self.cfg.hub.hub_strategy != "end":
            self.push_model(self.last_eval, checkpoint=Path(saved), step=step)

    def push_model(self, metrics: dict, checkpoint: Path | None = None, step: int | None = None) -> None:
        """Export the current model (and `ema/`) with a model card to a scratch folder and push that in the background.

        After a save (`step` given) the pusher's strategy decides what goes (`checkpoint` also sends the checkpoint
        to `last-checkpoint/`, so a run can resume from the Hub); without one, this is the end-of-training push.
        """
        if not self.cfg.hub.push_to_hub or self.export is None:
            return
        self.accelerator.wait_for_everyone()
        scratch = (
            Path(tempfile.mkdtemp(dir=self.out, prefix=".tmp-push-")) if self.accelerator.is_main_process else None
        )
        scratch = Path(broadcast_object(str(scratch)))
        self.export(scratch, self.cfg.ema.final_model == "ema")  # a collective under sharding: every rank takes part
        if self.ema is not None:
            self.export(scratch / "ema", True)
        if self.pusher is not None:
            self.card(scratch, metrics)
            # the pusher snapshots the folders first, so the scratch folder can go at once
            if step is None:
                self.pusher.push(scratch, "End of training")
            else:
                self.pusher.push_save(scratch, checkpoint, step)
        if self.accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)


# what torch says when a checkpoint's weights do not fit the model they are loaded into
LOAD_MISMATCH = ("size mismatch", "Missing key(s)", "Unexpected key(s)", "Error(s) in loading state_dict")
MODEL_SECTIONS = ("model", "data", "discriminator", "finetune")  # the settings that shape a stage's networks


def settings_that_differ(cfg: StageConfig, saved: dict) -> str:
    """The model-shaping settings of this run that differ from a checkpoint's (its saved flat config)."""
    names = [f.name for section, cls in sections(type(cfg)).items() if section in MODEL_SECTIONS
             for f in dataclasses.fields(cls)]  # fmt: skip
    now = cfg.to_flat_dict()
    differ = [f"{n}={now[n]!r} here, {saved[n]!r} in the checkpoint" for n in names if saved.get(n, now[n]) != now[n]]
    return "; ".join(differ) if differ else "its weights have other shapes (no setting of this run differs from it)"


def broadcast_object(value):
    """The main process's value on every rank."""
    box = [value]
    broadcast_object_list(box)
    return box[0]


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


def model_card_writer(cfg: StageConfig, stage: str, base_model: str | None, datasets: list[str] | None):
    """card(folder, metrics): the README.md model card pushed with every upload."""

    def card(folder: Path, metrics: dict) -> None:
        write_model_card(
            folder,
            repo_id=cfg.hub.hub_model_id,
            stage=stage,
            base_model=base_model,
            datasets=datasets,
            hyperparameters=cfg.to_flat_dict(),
            metrics={k: v for k, v in metrics.items() if k != "step"},
        )

    return card
