"""The pretrain stage: a model of the chosen family learns from scratch (or continues) on large, diverse data,
optionally easiest clips first (curriculum)."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from hf_audio_trainer.batching import TokenBudgetSampler
from hf_audio_trainer.config import PretrainConfig, resolve_config
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.segments import segment_schedule
from hf_audio_trainer.data.streamed import StreamPlan, open_stream
from hf_audio_trainer.data.streaming import ShardStream
from hf_audio_trainer.difficulty import score_difficulty
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families import Family, family_for
from hf_audio_trainer.stages.common import (
    Run,
    RunResult,
    global_batch_size,
    load_clips,
    run_length,
    start_run,
    train_model,
)


def pretrain(config: PretrainConfig | dict | str | None = None) -> RunResult:
    """Pretrain an audio model from scratch (or continue one); usable from a notebook."""
    cfg = resolve_config(config, PretrainConfig)
    family = family_for(cfg.model.model_family, "pretrain")
    with start_run(cfg, "pretrain") as run:
        data, sampler, max_steps, models = prepare_training(run, family)
        return train_model(run, family, data, models, sampler, max_steps, base_model=cfg.model.model_name_or_path)


def prepare_training(run: Run, family: Family):
    """What pretrain and finetune train on: the selected clips as the family reads them, their order (curriculum),
    the run's length, and the family's networks (new, or loaded from --model_name_or_path)."""
    if run.cfg.data.streaming:
        if not family.streams:
            raise ConfigError(f"--streaming: the {family.name} family trains on loaded data; drop --streaming")
        clips = stream_clips(run)
    else:
        clips = load_clips(run, select=lambda r, clips: select_rows(r, family, clips))
    data = family.preprocess(run, clips)
    sampler = curriculum_sampler(run, data)
    max_steps = run_length(run, sampler)
    return data, sampler, max_steps, family.build_model(run, data, run.cfg.model.model_name_or_path)


def select_rows(run: Run, family: Family, clips: dict[str, Dataset]) -> dict[str, Dataset]:
    """Score difficulty if asked, check the curriculum has what it needs, keep the rows the stage trains on (and
    measure a high-quality-only stage on the clean validation rows)."""
    cfg, c = run.cfg, run.cfg.curriculum
    train = clips["train"]
    if c.high_quality_only and "quality" not in train.column_names and "high_quality_only" not in cfg.user_set:
        # a default selection (finetune's) that this data cannot support is skipped; one the user asked for is not
        run.accelerator.print("high_quality_only: the dataset has no 'quality' column, so every training row is used")
        c.high_quality_only = False
    if c.difficulty_method is not None:
        train = score_difficulty(
            train, c.difficulty_method, audio_column=cfg.data.audio_column, column=c.difficulty_column,
            model_name_or_path=c.difficulty_model, num_proc=cfg.data.preprocessing_num_workers,
            clip_scorer=family.load_clip_scorer,
        )  # fmt: skip
    paced = c.curriculum != "none" and not c.curriculum_segments  # a sequence-length curriculum paces windows
    if (paced or c.max_difficulty is not None) and "difficulty" not in train.column_names:
        raise ConfigError(
            f"--curriculum {c.curriculum} / --max_difficulty need a difficulty score per clip, but the dataset has no "
            "'difficulty' column: pass --difficulty_method acoustic (or column, model_loss) to score it, or add a "
            "'difficulty' column to the dataset"
        )
    validation = clips["validation"]
    if c.high_quality_only:
        if "quality" not in train.column_names:
            raise ConfigError(
                f"--high_quality_only reads a 'quality' column, which the dataset lacks (columns: "
                f"{train.column_names}); add one ('clean' marks the rows to keep) or use --max_difficulty"
            )
        train = train.filter(lambda q: q == "clean", input_columns="quality", desc="Keeping clean rows")
        if "quality" in validation.column_names:
            # the stage aims at the high-quality distribution: measure it there (if any validation row is clean)
            clean = validation.filter(
                lambda q: q == "clean", input_columns="quality", desc="Keeping clean validation rows"
            )
            validation = clean if len(clean) else validation
    if c.max_difficulty is not None:
        limit = c.max_difficulty
        train = train.filter(lambda d: d <= limit, input_columns="difficulty", desc="Keeping easy rows")
    if len(train) == 0:
        raise ConfigError("no training rows are left after --high_quality_only / --max_difficulty; loosen them")
    return {"train": train, "validation": validation}


def stream_clips(run: Run) -> dict:
    """--streaming: this rank's stream of the training shards, and the first validation rows as a Dataset."""
    d, acc = run.cfg.data, run.accelerator
    train, validation = open_stream(
        d.dataset_name, d.audio_column, run.cfg.training.seed, acc.process_index, acc.num_processes,
        d.streaming_validation_rows, max_member_bytes=int(d.streaming_max_member_mb * 2**20),
    )  # fmt: skip
    acc.print(f"streaming {len(train.shards)} shards ({sum(train.rows)} rows), {train.rows_per_rank(0)} per process")
    return {"train": train, "validation": validation}


def curriculum_sampler(run: Run, data) -> CurriculumSampler | TokenBudgetSampler | StreamPlan:
    """The data order: the curriculum's pacing over difficulty (a plain seeded shuffle with `none`), one global
    order split by rank, optionally batching clips of similar length; or, with --max_tokens_per_batch, batches by
    duration (their windows growing under --curriculum_segments)."""
    acc, c, t, train = run.accelerator, run.cfg.curriculum, run.cfg.training, data.train
    if isinstance(train, ShardStream):
        return StreamPlan(train, t.per_device_train_batch_size * t.gradient_accumulation_steps)
    window = getattr(data, "segment_frames", None)
    frames = train["num_frames"] if c.group_by_length or t.max_tokens_per_batch or c.curriculum_segments else None
    if c.curriculum_segments or t.max_tokens_per_batch is not None:
        codebooks = data.tokenizer.num_codebooks
        if t.max_tokens_per_batch is None:  # the fixed batch's tokens, as a budget: steps stay comparable
            t.max_tokens_per_batch = t.per_device_train_batch_size * (window + codebooks - 1) * codebooks
            acc.print(
                f"--curriculum_segments: batching by tokens, {t.max_tokens_per_batch} per micro-batch "
                f"(--per_device_train_batch_size x a full window of {window} frames + the delay x {codebooks} "
                "codebooks)"
            )
        schedule = segment_schedule(
            window, c.curriculum if c.curriculum_segments else None, c.curriculum_start_fraction, c.curriculum_steps
        )
        return TokenBudgetSampler(
            frames, t.max_tokens_per_batch, codebooks, t.gradient_accumulation_steps, acc.num_processes,
            acc.process_index, seed=t.seed, segment_frames=schedule, extra_frames=codebooks - 1,  # the delay pattern
        )  # fmt: skip
    difficulties = train["difficulty"] if "difficulty" in train.column_names else [0.0] * len(train)
    lengths = None
    if c.group_by_length:
        lengths = np.minimum(frames, window) if window is not None else frames
    return CurriculumSampler(
        difficulties, global_batch_size(run), pacing=c.curriculum, start_fraction=c.curriculum_start_fraction,
        curriculum_steps=c.curriculum_steps, num_replicas=acc.num_processes, rank=acc.process_index,
        seed=t.seed, lengths=lengths,
    )  # fmt: skip
