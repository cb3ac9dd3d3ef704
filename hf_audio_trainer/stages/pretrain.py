"""The pretrain and finetune stages: next-code prediction on audio tokens, from scratch or from a pretrained model."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from datasets import Dataset

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.checkpoint import Checkpointer, prepare_output_dir
from hf_audio_trainer.codecs import MelKMeansTokenizer, load_audio_tokenizer
from hf_audio_trainer.config import (
    FinetuneConfig,
    PretrainConfig,
    resolve_config,
)
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.audio import decode_audio, load_audio_dataset
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches, tokenize_dataset
from hf_audio_trainer.difficulty import score_difficulty
from hf_audio_trainer.distributed import prepare, stage_accelerator
from hf_audio_trainer.ema import build_ema
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.hub import model_card_writer, start_pusher
from hf_audio_trainer.loop import evaluate_loss
from hf_audio_trainer.models import adapt_for_finetuning, build_model, lm_loss, num_parameters
from hf_audio_trainer.optim import build_optimization
from hf_audio_trainer.samples import SampleEvaluator
from hf_audio_trainer.stages.common import (
    RunResult,
    fit_run_length,
    loop_settings,
    train_and_finish,
)
from hf_audio_trainer.system import training_flops_per_token

logger = logging.getLogger(__name__)


TOKENIZER_DIR = "tokenizer"


FIT_CLIPS = 500  # clips a new mel k-means tokenizer is fitted on


SAMPLE_RATE = 16000  # of a new mel k-means tokenizer


def prepare_tokenizer(cfg: PretrainConfig, accelerator: Accelerator, train_set: Dataset, resume: Path | None):
    """The checkpoint's tokenizer when resuming, a given one, or a mel k-means fitted on training clips."""
    source = resume / TOKENIZER_DIR if resume is not None else cfg.data.tokenizer
    if source is None and cfg.model.model_name_or_path is not None:  # a model keeps its tokenizer beside it
        source = model_tokenizer(cfg.model.model_name_or_path)
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


def model_tokenizer(model_name_or_path: str) -> str:
    """The tokenizer saved with a model: MODEL/tokenizer in a folder, or the `tokenizer/` files of a Hub repo."""
    folder = Path(model_name_or_path)
    if folder.is_dir():
        if not (folder / TOKENIZER_DIR).is_dir():
            raise ConfigError(
                f"{folder} has no {TOKENIZER_DIR}/ folder: pass the tokenizer the model was trained with (--tokenizer)"
            )
        return str(folder / TOKENIZER_DIR)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(model_name_or_path, allow_patterns=[f"{TOKENIZER_DIR}/*"])
    except Exception as err:
        raise ConfigError(
            f"could not get the tokenizer of {model_name_or_path!r} (a folder or Hub id with a {TOKENIZER_DIR}/ "
            f"subfolder): {err}; pass --tokenizer"
        ) from None
    return str(Path(local) / TOKENIZER_DIR)


def select_training_rows(train: Dataset, cfg: PretrainConfig, say=print) -> Dataset:
    """Score difficulty if asked, check the curriculum has what it needs, keep the rows the stage trains on."""
    c = cfg.curriculum
    if c.high_quality_only and "quality" not in train.column_names and "high_quality_only" not in cfg.user_set:
        # a default selection (finetune's) that this data cannot support is skipped; one the user asked for is not
        say("high_quality_only: the dataset has no 'quality' column, so every training row is used")
        c.high_quality_only = False
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
        raise ConfigError(
            f"--curriculum {c.curriculum} / --max_difficulty need a difficulty score per clip, but the dataset has no "
            "'difficulty' column: pass --difficulty_method acoustic (or column, model_loss) to score it, or add a "
            "'difficulty' column to the dataset"
        )
    if c.high_quality_only:
        if "quality" not in train.column_names:
            raise ConfigError(
                f"--high_quality_only reads a 'quality' column, which the dataset lacks (columns: "
                f"{train.column_names}); add one ('clean' marks the rows to keep) or use --max_difficulty"
            )
        train = train.filter(lambda q: q == "clean", input_columns="quality", desc="Keeping clean rows")
    if c.max_difficulty is not None:
        limit = c.max_difficulty
        train = train.filter(lambda d: d <= limit, input_columns="difficulty", desc="Keeping easy rows")
    if len(train) == 0:
        raise ConfigError("no training rows are left after --high_quality_only / --max_difficulty; loosen them")
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
        raw["train"] = select_training_rows(raw["train"], cfg, say=accelerator.print)
        val = raw["validation"]
        if cfg.curriculum.high_quality_only and "quality" in val.column_names:
            # the stage aims at the high-quality distribution: measure it there (if any validation row is clean)
            clean = val.filter(lambda q: q == "clean", input_columns="quality", desc="Keeping clean validation rows")
            raw["validation"] = clean if len(clean) else val
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
    with stage_accelerator(cfg) as accelerator:
        return _train_lm(cfg, accelerator, "pretrain")


def finetune(config: FinetuneConfig | dict | str | None = None) -> RunResult:
    """Fine-tune a pretrained model (folder or Hub id) on high-quality data, optionally with LoRA; notebook-ready."""
    cfg = resolve_config(config, FinetuneConfig)
    with stage_accelerator(cfg) as accelerator:
        return _train_lm(cfg, accelerator, "finetune")


def _train_lm(cfg: PretrainConfig, accelerator: Accelerator, stage: str) -> RunResult:
    """Next-code prediction on audio tokens: the pretrain and finetune stages."""
    t, out = cfg.training, Path(cfg.training.output_dir)
    resume = prepare_output_dir(cfg, accelerator)
    pusher = start_pusher(cfg, accelerator)
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
    fit_run_length(cfg, accelerator, max_steps)
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
    if stage == "finetune":
        f = cfg.finetune
        model = adapt_for_finetuning(
            model, f.freeze_modules, f.use_peft, f.lora_r, f.lora_alpha, f.lora_dropout, f.lora_target_modules
        )
    optimizer, scheduler = build_optimization(cfg, accelerator, model, global_batch, max_steps)
    model, optimizer, scheduler = prepare(cfg, accelerator, model, optimizer, scheduler)
    ema = build_ema(cfg, accelerator.unwrap_model(model))

    def export(folder: Path, use_ema: bool) -> None:
        unwrapped = accelerator.unwrap_model(model)
        swap = ema.average_parameters(unwrapped) if use_ema else contextlib.nullcontext()
        with swap:  # LoRA adapters are merged into a copy: the export is a plain from_pretrained model
            save_tokenizer = lambda f: tokenizer.save_pretrained(f / TOKENIZER_DIR)  # noqa: E731
            ckpt.save_final_model(accelerator, model, folder, save_tokenizer, merge_lora=cfg_uses_peft(cfg))

    checkpointer = Checkpointer(
        cfg,
        accelerator,
        global_batch,
        max_steps,
        save_extras=lambda folder: tokenizer.save_pretrained(folder / TOKENIZER_DIR),
        extra_state=lambda step: {"sampler": sampler.state_at_step(step)},
        ema=ema,
        pusher=pusher,
        export=export,
        card=model_card_writer(cfg, stage, cfg.model.model_name_or_path, [cfg.data.dataset_name or "synthetic"]),
    )
    start_step = checkpointer.resume(resume) if resume is not None else 0
    accelerator.init_trackers(stage, config=cfg.to_flat_dict())
    trainable = num_parameters(model, trainable_only=True)
    accelerator.print(
        f"{len(train_set)} train / {len(val_set)} validation clips, up to {max_frames} frames; "
        f"{num_parameters(model):,} parameters ({trainable:,} trained); "
        f"global batch {global_batch}; {max_steps} steps"
    )

    model_config = accelerator.unwrap_model(model).config
    collate = CodesCollator(
        tokenizer.num_codebooks, model_config.pad_token_id, model_config.bos_token_id, tokenizer.frame_rate
    )
    batches = batch_stream(train_set, sampler, t.per_device_train_batch_size, collate, start_step)

    lg = cfg.logging
    sampler_eval = None
    if lg.fad_embedder is not None:
        sampler_eval = SampleEvaluator(
            accelerator, tokenizer, val_set, lg.fad_embedder, lg.fad_embedder_model, lg.num_eval_samples,
            lg.eval_sample_seconds, out, seed=t.seed,
        )  # fmt: skip

    def evaluate(step: int) -> dict[str, float]:
        stream = lambda: eval_batches(  # noqa: E731
            val_set, t.per_device_eval_batch_size, collate, accelerator.process_index, accelerator.num_processes
        )
        results = {"eval/loss": evaluate_loss(accelerator, model, stream, lm_loss)}
        if ema is not None:
            with ema.average_parameters(accelerator.unwrap_model(model)):
                results["eval/loss_ema"] = evaluate_loss(accelerator, model, stream, lm_loss)
                if sampler_eval is not None:  # generation uses the EMA weights when there are some
                    results.update(sampler_eval(model, step))
        elif sampler_eval is not None:
            results.update(sampler_eval(model, step))
        checkpointer.record(step, results)
        return results

    # smoothing shapes the training targets only; validation reports the plain cross-entropy
    train_loss = functools.partial(lm_loss, label_smoothing=cfg.loss.label_smoothing)
    flops = training_flops_per_token(num_parameters(model), tokenizer.num_codebooks)
    settings = loop_settings(cfg, accelerator, max_steps, flops_per_item=flops)
    return train_and_finish(
        cfg, accelerator, checkpointer, settings, model, optimizer, scheduler, batches, train_loss, start_step,
        evaluate, ema,
    )  # fmt: skip


def cfg_uses_peft(cfg: PretrainConfig) -> bool:
    return isinstance(cfg, FinetuneConfig) and cfg.finetune.use_peft
