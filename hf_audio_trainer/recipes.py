"""The training stages as functions: build the pieces from a config, run the loop, return what was made."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from datasets import Dataset
from safetensors.torch import load_file, save_file

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.config import PretrainConfig, parse_config, resolve_config
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.audio import decode_audio, load_audio_dataset
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches, tokenize_dataset
from hf_audio_trainer.difficulty import score_difficulty
from hf_audio_trainer.ema import EMA
from hf_audio_trainer.loop import LoopSettings, NonFiniteError, evaluate_loss, train
from hf_audio_trainer.models import build_model, lm_loss
from hf_audio_trainer.optim import build_optimizer, build_scheduler, scale_lr
from hf_audio_trainer.tokenizers import MelKMeansTokenizer, load_audio_tokenizer
from hf_audio_trainer.trackers import METRICS_FILE, JSONLinesTracker, read_metrics, truncate_metrics

logger = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"
EMA_FILE = "ema.safetensors"  # the EMA state inside a checkpoint
FIT_CLIPS = 500  # clips a new mel k-means tokenizer is fitted on
SAMPLE_RATE = 16000  # of a new mel k-means tokenizer


@dataclass
class RunResult:
    """What a stage produced."""

    output_dir: str
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_tokenizer(cfg: PretrainConfig, accelerator: Accelerator, train_set: Dataset, resume: Path | None):
    """The checkpoint's tokenizer when resuming, a given one, or a mel k-means fitted on training clips."""
    source = resume / TOKENIZER_DIR if resume is not None else cfg.data.tokenizer
    if source is not None:
        if (Path(source) / TOKENIZER_DIR).is_dir():  # a run's output folder or checkpoint: its tokenizer inside
            source = Path(source) / TOKENIZER_DIR
        return load_audio_tokenizer(str(source))
    fitted = Path(cfg.training.output_dir) / TOKENIZER_DIR
    if accelerator.is_main_process:  # fit once, the other ranks load the result
        rng = np.random.default_rng(cfg.training.seed)
        rows = rng.permutation(len(train_set))[:FIT_CLIPS].tolist()
        audio = train_set.select(rows)[cfg.data.audio_column]
        waves = [decode_audio(a, SAMPLE_RATE, where=f"train row {r}") for a, r in zip(audio, rows, strict=True)]
        tokenizer = MelKMeansTokenizer.fit(
            waves,
            sample_rate=SAMPLE_RATE,
            num_codebooks=cfg.data.num_codebooks,
            codebook_size=cfg.data.codebook_size,
            seed=cfg.training.seed,
        )
        tokenizer.save_pretrained(fitted)
    accelerator.wait_for_everyone()
    return load_audio_tokenizer(str(fitted))


def select_training_rows(train: Dataset, cfg: PretrainConfig) -> Dataset:
    """Score difficulty if asked, check the curriculum has what it needs, keep the rows the stage trains on."""
    c = cfg.curriculum
    if c.difficulty_method is not None:
        train = score_difficulty(
            train,
            c.difficulty_method,
            audio_column=cfg.data.audio_column,
            column=c.difficulty_column,
            model_name_or_path=c.difficulty_model,
            num_proc=cfg.data.preprocessing_num_workers,
        )
    if (c.curriculum != "none" or c.max_difficulty is not None) and "difficulty" not in train.column_names:
        raise ValueError(
            f"--curriculum {c.curriculum} / --max_difficulty need a difficulty score per clip, but the dataset has no "
            "'difficulty' column: pass --difficulty_method acoustic (or column, model_loss) to score it, or add a "
            "'difficulty' column to the dataset"
        )
    if c.high_quality_only:
        if "quality" not in train.column_names:
            raise ValueError(
                f"--high_quality_only reads a 'quality' column, which the dataset lacks (columns: "
                f"{train.column_names}); add one ('clean' marks the rows to keep) or use --max_difficulty"
            )
        train = train.filter(lambda q: q == "clean", input_columns="quality", desc="Keeping clean rows")
    if c.max_difficulty is not None:
        limit = c.max_difficulty
        train = train.filter(lambda d: d <= limit, input_columns="difficulty", desc="Keeping easy rows")
    if len(train) == 0:
        raise ValueError("no training rows are left after --high_quality_only / --max_difficulty; loosen them")
    return train


def prepare_data(cfg: PretrainConfig, accelerator: Accelerator, resume: Path | None):
    """Load the audio, get a tokenizer, and tokenize both splits once (cached by datasets where it can)."""
    with accelerator.main_process_first():
        raw = load_audio_dataset(
            cfg.data.dataset_name,
            audio_column=cfg.data.audio_column,
            validation_split_percentage=cfg.data.validation_split_percentage,
            seed=cfg.training.seed,
            dataset_config_name=cfg.data.dataset_config_name,
            synthetic_num_clips=cfg.data.synthetic_num_clips,
        )
        raw["train"] = select_training_rows(raw["train"], cfg)
    tokenizer = prepare_tokenizer(cfg, accelerator, raw["train"], resume)
    with accelerator.main_process_first():
        splits = {
            name: tokenize_dataset(
                raw[name],
                tokenizer,
                cfg.data.audio_column,
                cfg.data.max_duration_seconds,
                cfg.data.preprocessing_num_workers,
                split=name,
            )
            for name in ("train", "validation")
        }
    return tokenizer, splits["train"], splits["validation"]


def pretrain(config: PretrainConfig | dict | str | None = None) -> RunResult:
    """Pretrain an audio language model from scratch (or continue one); usable from a notebook."""
    cfg = resolve_config(config, PretrainConfig)
    accelerator = Accelerator(
        mixed_precision=cfg.training.mixed_precision,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        log_with=[JSONLinesTracker(cfg.training.output_dir), *cfg.logging.trackers],
        project_dir=cfg.training.output_dir,
        # the schedule counts optimizer steps; accelerate would otherwise step it once per process
        step_scheduler_with_optimizer=False,
    )
    try:
        return _pretrain(cfg, accelerator)
    finally:
        accelerator.end_training()
        # accelerate keeps its settings in process-wide singletons; clear them so a notebook can run the next
        # stage with, say, another precision (the process group, in PartialState, is kept)
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _pretrain(cfg: PretrainConfig, accelerator: Accelerator) -> RunResult:
    t, out = cfg.training, Path(cfg.training.output_dir)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would accept this and silently train in fp32 (no autocast, no loss scaling on CPU)
        raise ValueError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")
    resume = ckpt.resolve_resume(cfg.checkpoint.resume_from_checkpoint, out)
    ckpt.check_output_dir(out, resuming=resume is not None, overwrite=t.overwrite_output_dir)
    if accelerator.is_main_process:
        if resume is None:  # a new run: old checkpoints (allowed by --overwrite_output_dir) and logs go
            ckpt.remove_checkpoints(out)
            (out / METRICS_FILE).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_flat_dict(), indent=2))
    set_seed(t.seed)

    tokenizer, train_set, val_set = prepare_data(cfg, accelerator, resume)
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    difficulties = train_set["difficulty"] if "difficulty" in train_set.column_names else [0.0] * len(train_set)
    c = cfg.curriculum
    sampler = CurriculumSampler(
        difficulties,
        global_batch,
        pacing=c.curriculum,
        start_fraction=c.curriculum_start_fraction,
        curriculum_steps=c.curriculum_steps,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=t.seed,
        lengths=train_set["num_frames"] if c.group_by_length else None,
    )
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)
    if cfg.optim.warmup_steps >= max_steps:
        raise ValueError(
            f"warmup_steps={cfg.optim.warmup_steps} is not shorter than the {max_steps} steps of "
            f"{t.num_train_epochs} epoch(s): lower --warmup_steps or use --warmup_ratio"
        )
    max_frames = max(max(train_set["num_frames"]), max(val_set["num_frames"]))
    model = build_model(
        cfg.model.model_name_or_path,
        cfg.model.model_size,
        tokenizer.num_codebooks,
        tokenizer.codebook_size,
        # positions: BOS + frames + the delay of the last codebook
        max_positions=int(cfg.data.max_duration_seconds * tokenizer.frame_rate) + tokenizer.num_codebooks + 1,
        dropout=cfg.model.dropout,
    )
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
    scheduler = build_scheduler(optimizer, o.lr_scheduler_type, warmup, max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    e = cfg.ema
    ema = None
    if e.ema:
        ema = EMA(
            accelerator.unwrap_model(model),
            decay=e.ema_decay,
            update_every=e.ema_update_every,
            start_step=e.ema_start_step,
            warmup=e.ema_warmup,
            device="cpu" if e.ema_offload else None,
        )

    best_metric = cfg.checkpoint.metric_for_best_model or ("eval/loss_ema" if ema is not None else "eval/loss")
    best: dict = {}  # {"step", "value"} of the best checkpoint so far
    last_eval: dict = {}
    start_step = 0
    if resume is not None:
        state = ckpt.load_checkpoint(accelerator, resume)
        best = state.get("best", {})
        if ema is not None:
            if not (resume / EMA_FILE).is_file():
                raise ValueError(f"{resume} has no {EMA_FILE}: it was trained without --ema; resume without it")
            ema.load_state_dict(load_file(str(resume / EMA_FILE)))
        if state["global_batch_size"] != global_batch:
            raise ValueError(
                f"{resume} was trained with a global batch of {state['global_batch_size']}, this run has "
                f"{global_batch} (per-device batch x accumulation x processes); keep it the same to resume exactly"
            )
        start_step = state["global_step"]
        if accelerator.is_main_process:
            truncate_metrics(out, start_step)
        accelerator.print(f"Resumed from {resume} at step {start_step}")
    accelerator.init_trackers("pretrain", config=cfg.to_flat_dict())
    accelerator.print(
        f"{len(train_set)} train / {len(val_set)} validation clips, up to {max_frames} frames; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; global batch {global_batch}; {max_steps} steps"
    )

    model_config = accelerator.unwrap_model(model).config
    collate = CodesCollator(
        tokenizer.num_codebooks, model_config.pad_token_id, model_config.bos_token_id, tokenizer.frame_rate
    )
    batches = batch_stream(train_set, sampler, t.per_device_train_batch_size, collate, start_step)

    def evaluate(step: int) -> dict[str, float]:
        stream = lambda: eval_batches(  # noqa: E731
            val_set, t.per_device_eval_batch_size, collate, accelerator.process_index, accelerator.num_processes
        )
        results = {"eval/loss": evaluate_loss(accelerator, model, stream, lm_loss)}
        if ema is not None:
            with ema.average_parameters(accelerator.unwrap_model(model)):
                results["eval/loss_ema"] = evaluate_loss(accelerator, model, stream, lm_loss)
        last_eval.clear()
        last_eval.update(results, step=step)
        return results

    def save_extras(folder: Path) -> None:
        tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        if ema is not None:
            save_file(ema.state_dict(), str(folder / EMA_FILE))

    def save(step: int) -> None:
        # best is judged where a save follows an evaluation of the same step
        value = last_eval.get(best_metric) if last_eval.get("step") == step else None
        greater = cfg.checkpoint.greater_is_better
        is_best = value is not None and (not best or (value > best["value"] if greater else value < best["value"]))
        if is_best:
            best.update(step=step, value=value)
        state = {
            "global_step": step,
            "global_batch_size": global_batch,
            "max_steps": max_steps,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "sampler": sampler.state_at_step(step),
            "config": cfg.to_flat_dict(),
            "best": {**best, "metric": best_metric},
        }
        saved = ckpt.save_checkpoint(
            accelerator,
            out,
            step,
            state,
            save_extras,
            cfg.checkpoint.save_total_limit,
        )
        if is_best:
            ckpt.copy_to_best(accelerator, out, saved)

    settings = LoopSettings(
        max_steps=max_steps,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=o.max_grad_norm,
        logging_steps=cfg.logging.logging_steps,
        eval_steps=cfg.logging.eval_steps,
        save_steps=cfg.checkpoint.save_steps,
        eval_on_start=cfg.logging.eval_on_start,
        max_consecutive_skips=t.max_consecutive_skips,
    )
    # smoothing shapes the training targets only; validation reports the plain cross-entropy
    train_loss = functools.partial(lm_loss, label_smoothing=o.label_smoothing)
    try:
        metrics = train(
            accelerator, model, optimizer, scheduler, batches, train_loss, settings, start_step, evaluate, save, ema
        )
    except NonFiniteError as err:
        good = ckpt.list_checkpoints(out)
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise NonFiniteError(
            f"{err}: training diverged; {where}. Resume from it with a lower --learning_rate, a smaller "
            "--max_grad_norm or --mixed_precision bf16 instead of fp16"
        ) from err

    def export(folder: Path, use_ema: bool) -> None:
        swap = ema.average_parameters(accelerator.unwrap_model(model)) if use_ema else contextlib.nullcontext()
        with swap:
            ckpt.save_final_model(accelerator, model, folder, lambda f: tokenizer.save_pretrained(f / TOKENIZER_DIR))

    if ema is not None:
        export(out / "ema", use_ema=True)
    export(out, use_ema=e.final_model == "ema")
    evals = [(m["step"], m["eval/loss"]) for m in read_metrics(out) if "eval/loss" in m]
    if len(evals) > 1:
        (s0, first), (s1, last) = evals[0], evals[-1]
        accelerator.print(
            f"validation loss {first:.4f} at step {s0} -> {last:.4f} at step {s1} "
            f"({100 * (last - first) / first:+.1f}%)"
        )
    return RunResult(output_dir=str(out), global_step=max_steps, metrics=metrics)


def pretrain_cli(argv: list[str] | None = None, default_yaml: str | None = None) -> RunResult:
    """`accelerate launch recipes/pretrain.py [--config x.yaml] [--flag value ...]`; flags override the YAML."""
    return pretrain(parse_config(argv, PretrainConfig, default_yaml))
