"""The skeleton every stage shares, written once: start a run, load its clips, size it, then `train_model`: optimizer
and schedule, prepare, EMA, checkpoints and resume, trackers, evaluation (raw and EMA weights), the loop, the final
export. A stage module holds only what differs; the model family (`families/`) supplies the model-specific parts.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.checkpoint import Checkpointer, check_output_dir, resolve_resume
from hf_audio_trainer.config import StageConfig
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.audio import load_audio_dataset
from hf_audio_trainer.data.streaming import ShardStream
from hf_audio_trainer.distributed import check_shared_folder, on_main, prepare, stage_accelerator
from hf_audio_trainer.ema import build_ema
from hf_audio_trainer.errors import ConfigError, RemoteError
from hf_audio_trainer.families import Family
from hf_audio_trainer.hub import HubPusher, model_card_writer, start_pusher
from hf_audio_trainer.loop import LoopSettings, NonFiniteError, Preempted, train
from hf_audio_trainer.optim import build_optimization, rescale_learning_rate
from hf_audio_trainer.output_folder import recorded_final_model, remove_run_outputs, set_aside_later_steps, sweep
from hf_audio_trainer.system import peak_flops
from hf_audio_trainer.trackers import METRICS_FILE, read_metrics

DIVERGED = "a lower --learning_rate, a smaller --max_grad_norm or --mixed_precision bf16 instead of fp16"


@dataclass
class RunResult:
    """What a stage produced."""

    output_dir: str
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False  # stopped by SIGTERM/SIGINT after a checkpoint: resume with --resume_from_checkpoint latest


@dataclass
class Run:
    """One stage's run: its config, its accelerator, the checkpoint it resumes from (if any), its Hub pusher, and
    where that checkpoint's frozen parts are (`frozen`: its run's frozen/ folder, or the checkpoint itself when it
    holds them: written before frozen/ existed, or best/), which a family's `preprocess` reads back."""

    cfg: StageConfig
    accelerator: Accelerator
    stage: str
    resume: Path | None = None
    pusher: HubPusher | None = None
    frozen: Path | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.training.output_dir)


@contextlib.contextmanager
def start_run(cfg: StageConfig, stage: str) -> Iterator[Run]:
    """The accelerator and the output folder (locked, checked, seeded) for one stage, and the Hub repo created
    before any training (a bad token or id fails now, not hours later); all released on every exit."""
    t = cfg.training
    with stage_accelerator(t.output_dir, t.mixed_precision, t.gradient_accumulation_steps, cfg.logging.trackers) as acc:
        resume = prepare_output_dir(cfg, acc)
        frozen = on_main(acc, lambda: ckpt.frozen_parts_of(resume)) if resume is not None else None
        pusher = start_pusher(cfg.hub, acc)
        try:
            yield Run(cfg, acc, stage, resume, pusher, frozen)
        finally:
            # still holding the lock: a run that stopped early (a signal, an error) ends its uploads, or drops them
            # after --hub_stop_timeout, before the next run may start here (a finished run has nothing left)
            if pusher is not None:
                for dropped in pusher.close(cfg.hub.hub_stop_timeout, say=acc.print):
                    acc.print(f"Hub: {dropped} (the local files are complete)")


def prepare_output_dir(cfg: StageConfig, accelerator: Accelerator) -> Path | None:
    """Check the run can start here; returns the checkpoint to resume from, if any. Seeds everything."""
    t, out = cfg.training, Path(cfg.training.output_dir)
    for note in cfg.notes:  # defaults fitted to this run, warnings about values the user chose
        accelerator.print(note)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would accept this and silently train in fp32 (no autocast, no loss scaling on CPU)
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")
    check_shared_folder(accelerator, out)
    # one answer for every rank: each resolving `latest` itself could pick another checkpoint (a stale listing)
    resume = on_main(
        accelerator, lambda: resolve_resume(cfg.checkpoint.resume_from_checkpoint, out, warn=accelerator.print)
    )
    check_output_dir(out, resuming=resume is not None, overwrite=t.overwrite_output_dir)
    if accelerator.is_main_process:
        if swept := sweep(out):  # under the lock (start_run): no other run writes here
            accelerator.print(f"{out}: removed what an interrupted run left: {', '.join(swept)}")
        if resume is None:  # a new run: the old run's outputs (allowed by --overwrite_output_dir) and logs go
            remove_run_outputs(out)
            (out / METRICS_FILE).unlink(missing_ok=True)
        elif (aside := set_aside_later_steps(out, resume)) is not None:  # a rollback: the later steps go aside
            folder, moved = aside
            accelerator.print(
                f"{resume} is not the newest step in {out}: moved {', '.join(moved)} to {folder.name}/ (nothing is "
                "deleted; --resume_from_checkpoint latest now continues this run)"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_flat_dict(), indent=2))
    set_seed(t.seed)
    return resume


def check_start_model(cfg: StageConfig, what: str, before: str) -> None:
    """A stage that starts from a model (finetune, align) and was not given one starts from the recipe's default, the
    previous stage's output folder: it must be there, since only a name the user gave may be a Hub id."""
    path = cfg.model.model_name_or_path
    if "model_name_or_path" not in cfg.user_set and not Path(path).is_dir():
        raise ConfigError(
            f"{what}: the default --model_name_or_path {path} is not a folder here; run recipes/{before}.py first, or "
            f"pass --model_name_or_path (a {before} output folder or Hub id)"
        )


def load_clips(run: Run, select: Callable[[Run, dict[str, Dataset]], dict[str, Dataset]] | None = None):
    """The train and validation clips of the run's data section (`select` keeps the rows a stage trains on)."""
    cfg, d = run.cfg, run.cfg.data
    with run.accelerator.main_process_first():
        clips = load_audio_dataset(
            d.dataset_name, audio_column=d.audio_column, validation_split_percentage=d.validation_split_percentage,
            seed=cfg.training.seed, dataset_config_name=d.dataset_config_name,
            synthetic_num_clips=d.synthetic_num_clips, cache_dir=preprocessing_cache(d),
        )  # fmt: skip
        return select(run, clips) if select is not None else clips


def preprocessing_cache(data_config) -> Path:
    """Where this run's data caches go (generated synthetic clips, tokenized codes)."""
    from hf_audio_trainer.data.preprocess import default_cache_dir

    return Path(getattr(data_config, "preprocessing_cache_dir", None) or default_cache_dir())


def run_length(run: Run, sampler: CurriculumSampler) -> int:
    """Optimizer steps of the run (--max_steps, or --num_train_epochs of the sampler's epochs), with the settings
    counted in steps fitted to it."""
    t = run.cfg.training
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)
    for note in run.cfg.fit_to_run(max_steps):
        run.accelerator.print(note)
    return max_steps


def global_batch_size(run: Run) -> int:
    t = run.cfg.training
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * run.accelerator.num_processes


def shuffled_sampler(run: Run, num_rows: int) -> CurriculumSampler:
    """A seeded shuffle of all rows, one global order split by rank (no curriculum)."""
    acc = run.accelerator
    return CurriculumSampler(
        [0.0] * num_rows, global_batch_size(run), num_replicas=acc.num_processes, rank=acc.process_index,
        seed=run.cfg.training.seed,
    )  # fmt: skip


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


def train_model(
    run: Run,
    family: Family,
    data,
    models: dict,
    sampler: CurriculumSampler,
    max_steps: int,
    *,
    summary: str | None = None,
    loss_fn: Callable | None = None,
    eval_loss_fn: Callable | None = None,
    base_model: str | None = None,
    count_flops: bool = True,
    advice: str = DIVERGED,
) -> RunResult:
    """Train `models` (the family's networks, the first the main one) on `data` for `max_steps`, then export.

    `loss_fn` replaces the family's training loss (align's DPO objective, which `eval_loss_fn` evaluates);
    `summary` the family's description in the line printed at start.
    """
    cfg, acc = run.cfg, run.accelerator
    global_batch = global_batch_size(run)
    main = next(iter(models))
    if family.optimizers is not None:
        optimizers, schedulers = family.optimizers(run, data, models, global_batch, max_steps)
    else:
        optimizer, scheduler = build_optimization(cfg.optim, acc, models[main], global_batch, max_steps)
        optimizers, schedulers = [optimizer], [scheduler]
    if family.prepare is not None:
        models, optimizers, schedulers = family.prepare(run, data, models, optimizers, schedulers)
    else:
        micro_batch, max_norm = cfg.training.per_device_train_batch_size, cfg.optim.max_grad_norm
        model, optimizer, scheduler = prepare(acc, models[main], optimizers[0], schedulers[0], micro_batch, max_norm)
        models, optimizers, schedulers = {main: model}, [optimizer], [scheduler]
    model = models[main]
    ema = build_ema(cfg.ema, acc.unwrap_model(model))

    def export(folder: Path, use_ema: bool) -> None:
        with ema.average_parameters(acc.unwrap_model(model)) if use_ema else contextlib.nullcontext():
            family.export(run, data, models, folder)

    identity = data_identity(cfg, data)

    def extra_state(step: int) -> dict:  # the data position, what it is a position in, what else the family needs
        extra = family.checkpoint_state(data) if family.checkpoint_state is not None else {}
        return {"sampler": sampler.state_at_step(step), "data": identity, **extra}

    files, frozen_files = family.checkpoint_files, family.frozen_files
    datasets = [getattr(cfg.data, "dataset_name", None) or "synthetic"]
    flat = cfg.to_flat_dict()
    checkpointer = Checkpointer(
        cfg.checkpoint, acc, run.out, global_batch, max_steps, flat,
        save_extras=(lambda folder: files(run, data, models, folder)) if files else (lambda folder: None),
        extra_state=extra_state, ema=ema, pusher=run.pusher, export=export,
        card=model_card_writer(cfg.hub.hub_model_id, run.stage, base_model, datasets, flat, family.model_card),
        push=cfg.hub.hub_strategy if cfg.hub.push_to_hub else None, final_ema=cfg.ema.final_model == "ema",
        model_settings=cfg.model_settings(),
        frozen_files=(lambda folder: frozen_files(run, data, models, folder)) if frozen_files else None,
    )  # fmt: skip
    start_step = 0
    if run.resume is not None:
        check_same_data(cfg, run.resume, identity)
        start_step = checkpointer.resume(run.resume, run.frozen)
        saved = ckpt.verify_checkpoint(run.resume)
        continue_at_new_learning_rate(run, saved, optimizers[0], schedulers[0], start_step)
        if hasattr(sampler, "micro_batches"):  # batches by duration: plan from the checkpoint's epoch, not epoch 0
            sampler.load_state_dict(saved.get("sampler", {}))
        if family.load_checkpoint_state is not None:
            family.load_checkpoint_state(data, saved, run.resume)
    acc.init_trackers(run.stage, config=flat)
    budget = cfg.training.max_tokens_per_batch if hasattr(sampler, "micro_batches") else None
    batch = f"global batch {global_batch}" if budget is None else (
        f"global batch {global_batch // cfg.training.per_device_train_batch_size} micro-batches of <= {budget} tokens"
    )  # fmt: skip
    acc.print(f"{summary or family.describe(data, models)}; {batch}; {max_steps} steps")

    batches = family.batches(run, data, models, sampler, start_step)
    loss_fn = loss_fn or family.loss(run, data, models)
    evaluate_weights = family.evaluate(run, data, models, **({"loss_fn": eval_loss_fn} if eval_loss_fn else {}))

    def evaluate(step: int) -> dict[str, float]:
        """The raw weights, then the EMA's (generation-based metrics on the last of the two)."""
        results = evaluate_weights(step, "", ema is None)
        if ema is not None:
            with ema.average_parameters(acc.unwrap_model(model)):
                results.update(evaluate_weights(step, "_ema", True))
        checkpointer.record(step, results)
        return results

    flops = family.flops_per_item(models, data) if count_flops else 0.0
    settings = loop_settings(cfg, acc, max_steps, flops_per_item=flops)
    step_fn = family.step(run, data, models, optimizers, schedulers, loss_fn) if family.step else None

    def run_loop() -> dict[str, float]:
        return train(
            acc, model, optimizers[0], schedulers[0], batches, loss_fn, settings, start_step, evaluate,
            checkpointer.save, ema, step_fn=step_fn,
        )  # fmt: skip

    return run_and_finish(run, family, checkpointer, max_steps, run_loop, advice)


def continue_at_new_learning_rate(run: Run, saved: dict, optimizer, scheduler, step: int) -> None:
    """A resume given another --learning_rate (the usual answer to a loss spike) continues the restored schedule at
    the new peak: the restored optimizer and schedule would otherwise keep the checkpoint's rate. The main network's
    only (a codec's discriminator keeps its own --discriminator_learning_rate)."""
    then, now = saved.get("config", {}).get("learning_rate"), run.cfg.optim.learning_rate
    if "learning_rate" not in run.cfg.user_set or then is None or then == now:
        return
    if then == 0:
        raise ConfigError(
            f"{run.resume} was trained at --learning_rate 0, which no schedule can be scaled from; start a new run "
            "from its exported model (--model_name_or_path) instead"
        )
    rescale_learning_rate(optimizer, scheduler, now / then)
    run.accelerator.print(
        f"--learning_rate {now:g} (the checkpoint's {then:g}): the schedule continues from step {step} at the new peak"
    )


def data_identity(cfg: StageConfig, data) -> dict:
    """What a checkpoint's data position is a position in: the seed that orders the data, and the training rows
    (their datasets fingerprint and count, or a stream's shard list)."""
    train = data.train
    if isinstance(train, ShardStream):
        return {"seed": cfg.training.seed, "shards": [str(shard) for shard in train.shards]}
    return {"seed": cfg.training.seed, "rows": len(train), "fingerprint": getattr(train, "_fingerprint", None)}


def check_same_data(cfg: StageConfig, checkpoint: Path, identity: dict) -> None:
    """A resume continues the checkpoint's data order only over the same data and seed: refuse one that differs,
    naming what, unless --allow_data_change accepts it on purpose."""
    saved = ckpt.verify_checkpoint(checkpoint).get("data")
    if saved is None or cfg.checkpoint.allow_data_change:  # a checkpoint from before the record: nothing to compare
        return
    differ = []
    if saved["seed"] != identity["seed"]:
        differ.append(f"--seed {identity['seed']} here, {saved['seed']} in the checkpoint")
    if "shards" in saved or "shards" in identity:
        now, then = identity.get("shards", []), saved.get("shards", [])
        if now != then:
            added, gone = len(set(now) - set(then)), len(set(then) - set(now))
            differ.append(f"the shard list ({added} added, {gone} gone{'' if added or gone else ', reordered'})")
    elif (saved["rows"], saved["fingerprint"]) != (identity["rows"], identity["fingerprint"]):
        differ.append(f"the training data ({identity['rows']} rows here, {saved['rows']} in the checkpoint)")
    if differ:
        raise ConfigError(
            f"{checkpoint} was trained on another data order: {'; '.join(differ)}, so resuming would not continue "
            "it. Resume with the checkpoint's seed and data, or pass --allow_data_change to accept the change"
        )


def run_and_finish(
    run: Run,
    family: Family,
    checkpointer: Checkpointer,
    max_steps: int,
    run_loop: Callable[[], dict[str, float]],
    advice: str,
) -> RunResult:
    """Run the loop, then the final export (`finish`).

    A diverged run's error points at the last good checkpoint and says what to change (`advice`); a run stopped by a
    signal returns after its checkpoint (exit status 0), without exporting a final model.
    """
    try:
        metrics = run_loop()
    except NonFiniteError as err:
        good = ckpt.list_checkpoints(run.out)
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise NonFiniteError(f"{err}: training diverged; {where}. Resume from it with {advice}") from err
    except Preempted as stop:
        run.accelerator.print(
            f"Stopped by a signal after step {stop.step}; its checkpoint is written. Continue with "
            "--resume_from_checkpoint latest"
        )
        return RunResult(str(run.out), stop.step, stop.metrics, preempted=True)
    finish(run, family, checkpointer, metrics)
    return RunResult(str(run.out), max_steps, metrics)


def finish(run: Run, family: Family, checkpointer: Checkpointer, metrics: dict[str, float]) -> None:
    """Export the final model (and `ema/`), report the validation change, push with a model card, wait for uploads;
    a final push that failed is a `RemoteError` (the run exits non-zero; the model on disk is complete)."""
    cfg, out, export = run.cfg, run.out, checkpointer.export
    with recorded_final_model(out, checkpointer.max_steps, run.accelerator.is_main_process):
        if checkpointer.ema is not None:
            export(out / "ema", True)
        export(out, cfg.ema.final_model == "ema")
    metric, label = family.headline
    evals = [(m["step"], m[metric]) for m in read_metrics(out) if metric in m]
    if len(evals) > 1:
        (s0, first), (s1, last) = evals[0], evals[-1]
        run.accelerator.print(
            f"{label} {first:.4f} at step {s0} -> {last:.4f} at step {s1} ({100 * (last - first) / first:+.1f}%)"
        )
    final = checkpointer.push_model(metrics)
    if checkpointer.pusher is None:
        return
    failures = checkpointer.pusher.wait()
    # uploads run one at a time, in order: a failure of the final push, the last one, is the last failure
    final_failed = final is not None and final.result() is None
    for failure in failures[:-1] if final_failed else failures:
        run.accelerator.print(f"Hub upload failed (the local files are complete): {failure}")
    if final_failed:
        excluded = " ".join(f"--exclude '{pattern}'" for pattern in ("checkpoint-*", "best/*", "frozen/*", ".*"))
        raise RemoteError(
            f"{failures[-1]}; the final model in {out} is complete: upload it with "
            f"`hf upload {cfg.hub.hub_model_id} {out} {excluded}`"
        )
