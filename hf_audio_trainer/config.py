"""Run configuration: dataclass sections, YAML files and command-line overrides.

Every field has the flag name Hugging Face users already know (`--learning_rate`, `--save_steps` ...). A YAML file
(`--config file.yaml`) sets defaults, flat or grouped by section; command-line flags override it (TRL's rule).
Validation happens in `__post_init__`, before anything heavy runs, and names the field and the valid values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transformers import HfArgumentParser

from hf_audio_trainer.errors import ConfigError, MissingError

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
DEFAULT_SEGMENT_SECONDS = 30.0  # MusicGen's context


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_family(name: str, stage_default: str) -> None:
    from hf_audio_trainer.families import FAMILIES

    _check(name in FAMILIES, f"model_family={name!r}: choose one of {sorted(FAMILIES)} (this stage's: {stage_default})")


@dataclass
class ModelConfig:
    """Which model to train."""

    model_family: str = field(
        default="musicgen",
        metadata={
            "help": "The model family (see families.FAMILIES): musicgen, musicgen_text (text-conditioned), or flow "
            "(text-to-audio latent flow matching, a diffusers DiT)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A folder or Hub id to start from (musicgen: a MusicgenForCausalLM; musicgen_text: a "
            "MusicgenForConditionalGeneration such as facebook/musicgen-small); unset: a new model of --model_size."
        },
    )
    model_size: str = field(default="tiny", metadata={"help": "Size of a new model (see models.MODEL_SIZES)."})
    dropout: float | None = field(
        default=None, metadata={"help": "Override the model's dropout (0 makes runs comparable bit for bit)."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.families.musicgen import MODEL_SIZES

        _check_family(self.model_family, "musicgen")
        _check(self.model_size in MODEL_SIZES, f"model_size={self.model_size!r}: choose one of {sorted(MODEL_SIZES)}")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, f"dropout={self.dropout}: must be in [0, 1)")


@dataclass
class DataConfig:
    """Where the audio comes from and how it becomes code sequences."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A folder of audio files (optional metadata.csv), a save_to_disk folder or a Hub dataset id; "
            "unset: the embedded synthetic music dataset."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    audio_column: str = field(default="audio", metadata={"help": "Column holding the audio."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of train held out when the dataset has no validation split."}
    )
    synthetic_num_clips: int = field(default=2000, metadata={"help": "Clips in the embedded synthetic dataset."})
    max_duration_seconds: float | None = field(
        default=None,
        metadata={"help": "Tracks are cut to this length before tokenizing; unset: whole tracks, trained in windows."},
    )
    segment_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Training window: each draw of a track trains on a window this long, at a start drawn from "
            "(seed, epoch, row); validation uses each track's middle window. Unset: --max_duration_seconds if set, "
            f"else {DEFAULT_SEGMENT_SECONDS:g} s (MusicGen's context)."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader workers decoding audio for tokenizing (the codec runs on the device)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --dataset_name (a folder of parquet or webdataset .tar shards with a validation split, or "
            "a Hub id) instead of loading it: shards split across ranks, tokenized a batch at a time, exact resume."
        },
    )
    streaming_validation_rows: int = field(
        default=256, metadata={"help": "With --streaming: the first rows of the validation split evaluated on."}
    )
    preprocessing_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenized datasets are cached (keyed by data, codec and settings; reused by every run, "
            "stage and rank); unset: hf_audio_trainer/ in the datasets cache (HF_DATASETS_CACHE)."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "A saved audio tokenizer (folder or Hub id, mel_kmeans or EnCodec); unset: fit mel k-means."},
    )
    num_codebooks: int = field(default=4, metadata={"help": "Codebooks of a newly fitted tokenizer."})
    codebook_size: int = field(default=256, metadata={"help": "Entries per codebook of a newly fitted tokenizer."})

    def __post_init__(self) -> None:
        _check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        _check(self.synthetic_num_clips >= 2, f"synthetic_num_clips={self.synthetic_num_clips}: must be >= 2")
        _check(
            not self.streaming or self.dataset_name not in (None, "synthetic"),
            "--streaming needs --dataset_name: a folder of parquet or webdataset .tar shards, or a Hub id",
        )
        _check(self.streaming_validation_rows >= 1, "streaming_validation_rows must be >= 1")
        for name in ("max_duration_seconds", "segment_seconds"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"{name}={getattr(self, name)}: must be > 0")
        _check(self.num_codebooks >= 1, f"num_codebooks={self.num_codebooks}: must be >= 1")
        _check(2 <= self.codebook_size <= 32768, f"codebook_size={self.codebook_size}: must be in [2, 32768]")
        _check(bool(self.audio_column), "audio_column must be a column name")

    @property
    def window_seconds(self) -> float:
        """The training window's length in seconds (see `segment_seconds`)."""
        return self.segment_seconds or self.max_duration_seconds or DEFAULT_SEGMENT_SECONDS


@dataclass
class TextConfig:
    """Text conditioning (the musicgen_text family): the descriptions, the text encoder, classifier-free guidance."""

    text_column: str = field(
        default="description", metadata={"help": "Column with each clip's description (also a metadata.csv column)."}
    )
    instance_prompt: str | None = field(
        default=None,
        metadata={"help": "One description for every clip (DreamBooth style; replaces the text column if any)."},
    )
    condition_dropout: float = field(
        default=0.1,
        metadata={"help": "Probability that a training example gets the null condition (classifier-free guidance)."},
    )
    guidance_scale: float = field(
        default=3.0, metadata={"help": "Classifier-free guidance of in-loop samples and of the export (1: none)."}
    )
    train_text_encoder: bool = field(
        default=False, metadata={"help": "Train the text encoder too (default: frozen, its outputs computed once)."}
    )
    max_text_tokens: int = field(default=128, metadata={"help": "Descriptions are cut to this many text tokens."})
    clap_model: str | None = field(
        default=None,
        metadata={
            "help": "A ClapModel (folder or Hub id, e.g. laion/clap-htsat-unfused): log eval/clap_score, the "
            "text-audio similarity of in-loop samples to their prompts."
        },
    )

    def __post_init__(self) -> None:
        _check(bool(self.text_column), "text_column must be a column name")
        _check(0.0 <= self.condition_dropout < 1.0, f"condition_dropout={self.condition_dropout}: must be in [0, 1)")
        _check(self.guidance_scale >= 1.0, f"guidance_scale={self.guidance_scale}: must be >= 1 (1 is no guidance)")
        _check(self.max_text_tokens >= 1, f"max_text_tokens={self.max_text_tokens}: must be >= 1")


WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")  # diffusers' training_utils names


@dataclass
class FlowConfig:
    """The flow family: its latent space (a VAE) and the rectified-flow objective and sampler (diffusers' names)."""

    vae: str | None = field(
        default=None,
        metadata={
            "help": "An AutoencoderOobleck (folder or Hub id, or a pipeline folder with vae/) whose latents the DiT "
            "models; unset: the weight-free block DCT (lossless, --latent_hop_length samples a frame)."
        },
    )
    latent_hop_length: int = field(
        default=64, metadata={"help": "Samples per latent frame of the weight-free block DCT (its latent channels)."}
    )
    sample_rate: int = field(
        default=16000, metadata={"help": "Sample rate of the weight-free block DCT (a --vae has its own)."}
    )
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={"help": "Timestep density / loss weighting (SD3's): logit_normal, mode, sigma_sqrt, cosmap, none."},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal timestep density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the 'mode' timestep density."})
    num_inference_steps: int = field(default=25, metadata={"help": "Sampler steps of in-loop samples and the export."})

    def __post_init__(self) -> None:
        _check(
            self.weighting_scheme in WEIGHTING_SCHEMES,
            f"weighting_scheme={self.weighting_scheme!r}: choose one of {list(WEIGHTING_SCHEMES)}",
        )
        _check(self.logit_std > 0, f"logit_std={self.logit_std}: must be > 0")
        _check(self.num_inference_steps >= 1, f"num_inference_steps={self.num_inference_steps}: must be >= 1")
        _check(
            self.latent_hop_length >= 2 and self.latent_hop_length % 2 == 0,
            f"latent_hop_length={self.latent_hop_length}: must be an even number of samples >= 2",
        )


@dataclass
class CurriculumConfig:
    """Data order (curriculum learning) and which part of the data a stage trains on."""

    curriculum: str = field(
        default="none",
        metadata={"help": "Pacing: none (plain shuffle), linear, root, geometric, step, or anti (hardest first)."},
    )
    curriculum_start_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of the data (easiest first) open at step 0."}
    )
    curriculum_steps: int = field(default=1000, metadata={"help": "Steps until all of the data is open."})
    difficulty_method: str | None = field(
        default=None,
        metadata={
            "help": "Score difficulty before training: column, acoustic or model_loss; unset: use the "
            "dataset's `difficulty` column."
        },
    )
    difficulty_column: str = field(default="difficulty", metadata={"help": "Column read by difficulty_method column."})
    difficulty_model: str | None = field(
        default=None, metadata={"help": "Reference run folder (model + tokenizer/) for difficulty_method model_loss."}
    )
    group_by_length: bool = field(default=False, metadata={"help": "Batch clips of similar length (less padding)."})
    curriculum_segments: bool = field(
        default=False,
        metadata={
            "help": "Sequence-length curriculum: --curriculum's pacing grows the training window (short windows "
            "first, the full --segment_seconds from --curriculum_steps on) instead of opening harder clips; the "
            "batch is measured in tokens (--max_tokens_per_batch)."
        },
    )
    high_quality_only: bool = field(
        default=False, metadata={"help": "Train only on rows whose `quality` column is 'clean'."}
    )
    max_difficulty: float | None = field(
        default=None, metadata={"help": "Train only on rows whose difficulty is at most this."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.curriculum import PACING
        from hf_audio_trainer.difficulty import DIFFICULTY_METHODS

        _check(self.curriculum in PACING, f"curriculum={self.curriculum!r}: choose one of {sorted(PACING)}")
        _check(
            0.0 < self.curriculum_start_fraction <= 1.0,
            f"curriculum_start_fraction={self.curriculum_start_fraction}: must be in (0, 1]",
        )
        _check(self.curriculum_steps >= 1, f"curriculum_steps={self.curriculum_steps}: must be >= 1")
        _check(
            self.difficulty_method is None or self.difficulty_method in DIFFICULTY_METHODS,
            f"difficulty_method={self.difficulty_method!r}: choose one of {sorted(DIFFICULTY_METHODS)}",
        )
        _check(
            self.difficulty_method != "model_loss" or self.difficulty_model is not None,
            "difficulty_method=model_loss needs --difficulty_model (a run folder with the reference model)",
        )
        _check(
            self.max_difficulty is None or 0.0 <= self.max_difficulty <= 1.0,
            f"max_difficulty={self.max_difficulty}: must be in [0, 1]",
        )


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and clipping."""

    optim: str = field(default="adamw", metadata={"help": "Optimizer name (see optim.OPTIMIZERS)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "Decoupled weight decay (not on biases/norms)."})
    adam_beta1: float | None = field(
        default=None,
        metadata={"help": "beta1 (Adam, Lion, Sophia, LAMB; LARS momentum); default: the optimizer's own."},
    )
    adam_beta2: float | None = field(
        default=None, metadata={"help": "beta2; default: the optimizer's own (0.999 Adam-style, 0.99 Lion/Sophia)."}
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 disables."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers SchedulerType name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (overrides warmup_ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of max_steps."})
    sophia_rho: float = field(
        default=0.04, metadata={"help": "Sophia's clipping rho: updates are lr * clip(m / (rho * h), 1)."}
    )
    hessian_update_period: int = field(
        default=10, metadata={"help": "Sophia: refresh the Hessian estimate (one extra pass) every N steps."}
    )
    scale_lr: str | None = field(
        default=None,
        metadata={"help": "linear or sqrt: scale learning_rate by the effective batch / base_batch_size."},
    )
    base_batch_size: int = field(default=16, metadata={"help": "The effective batch learning_rate was tuned for."})

    def __post_init__(self) -> None:
        from transformers import SchedulerType

        from hf_audio_trainer.optim import OPTIMIZERS

        _check(self.optim in OPTIMIZERS, f"optim={self.optim!r}: choose one of {sorted(OPTIMIZERS)}")
        # 0 is allowed, as in HF Trainer: the natural check that a pipeline loads and exports a model unchanged
        _check(self.learning_rate >= 0, f"learning_rate={self.learning_rate}: must be >= 0")
        _check(self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            beta = getattr(self, name)
            _check(beta is None or 0 <= beta < 1, f"{name}={beta}: must be in [0, 1)")
        _check(self.sophia_rho > 0, f"sophia_rho={self.sophia_rho}: must be > 0")
        _check(self.hessian_update_period >= 1, f"hessian_update_period={self.hessian_update_period}: must be >= 1")
        _check(self.adam_epsilon > 0, f"adam_epsilon={self.adam_epsilon}: must be > 0")
        _check(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm}: must be >= 0 (0 disables clipping)")
        names = [s.value for s in SchedulerType]
        _check(self.lr_scheduler_type in names, f"lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {names}")
        _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        _check(
            self.scale_lr is None or self.scale_lr in ("linear", "sqrt"),
            f"scale_lr={self.scale_lr!r}: choose linear or sqrt",
        )
        _check(self.base_batch_size >= 1, f"base_batch_size={self.base_batch_size}: must be >= 1")


@dataclass
class LossConfig:
    """The language-model loss (align has its own objective, with TRL's `label_smoothing` for noisy preferences)."""

    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the training cross-entropy."})

    def __post_init__(self) -> None:
        _check(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing}: must be in [0, 1)")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for evaluation and exported as `ema/`."""

    ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay (typically 0.999-0.9999)."})
    ema_update_every: int = field(default=1, metadata={"help": "Update the EMA every N optimizer steps."})
    ema_start_step: int = field(default=0, metadata={"help": "Until this step the EMA copies the weights."})
    ema_warmup: bool = field(default=False, metadata={"help": "Ramp the decay up as (1 + n) / (10 + n)."})
    ema_power: float | None = field(
        default=None,
        metadata={
            "help": "Ramp the decay up as 1 - (1 + n)^-power, capped at --ema_decay (diffusers' EMAModel and "
            "Karras et al.'s power schedule: 2/3 for long runs, 3/4 for short ones)."
        },
    )
    ema_offload: bool = field(default=False, metadata={"help": "Keep the EMA on the CPU (saves GPU memory)."})
    final_model: str = field(
        default="raw", metadata={"help": "Which weights the output folder holds: raw or ema (the other: ema/)."}
    )

    def __post_init__(self) -> None:
        _check(0.0 < self.ema_decay < 1.0, f"ema_decay={self.ema_decay}: must be in (0, 1), typically 0.999-0.9999")
        _check(self.ema_update_every >= 1, f"ema_update_every={self.ema_update_every}: must be >= 1")
        _check(self.ema_start_step >= 0, f"ema_start_step={self.ema_start_step}: must be >= 0")
        _check(self.final_model in ("raw", "ema"), f"final_model={self.final_model!r}: choose raw or ema")
        _check(self.ema_power is None or self.ema_power > 0, f"ema_power={self.ema_power}: must be > 0")
        _check(
            self.ema_power is None or not self.ema_warmup,
            "--ema_warmup and --ema_power are two warm-up schedules; choose one",
        )
        _check(self.ema or self.final_model == "raw", "final_model=ema needs --ema")


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision and seed."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output_dir that already holds checkpoints."}
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
        _check(self.max_steps == -1 or self.max_steps > 0, f"max_steps={self.max_steps}: must be > 0, or -1")
        _check(self.num_train_epochs > 0, f"num_train_epochs={self.num_train_epochs}: must be > 0")
        _check(
            self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 1,
            f"max_tokens_per_batch={self.max_tokens_per_batch}: must be >= 1",
        )
        _check(self.max_consecutive_skips >= 0, f"max_consecutive_skips={self.max_consecutive_skips}: must be >= 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be >= 1")
        _check(
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision={self.mixed_precision!r}: choose one of {MIXED_PRECISION}",
        )


@dataclass
class LoggingConfig:
    """What is measured and where it goes."""

    logging_steps: int = field(default=10, metadata={"help": "Log train metrics every N optimizer steps."})
    eval_steps: int = field(default=100, metadata={"help": "Validation loss every N steps; 0 disables."})
    eval_on_start: bool = field(default=True, metadata={"help": "Also measure validation loss before step 1."})
    report_to: str = field(default="tensorboard", metadata={"help": "Comma-separated accelerate trackers, or 'none'."})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "One device's peak TFLOP/s for train/mfu; unset: a table of common GPUs."}
    )
    fad_embedder: str | None = field(
        default=None,
        metadata={"help": "Sample clips at every evaluation and log FAD vs validation: crepe, mel, encodec, clap."},
    )
    fad_embedder_model: str | None = field(
        default=None, metadata={"help": "The embedder's weights: a folder or Hub id (encodec, clap); crepe: tiny/full."}
    )
    num_eval_samples: int = field(default=16, metadata={"help": "Clips sampled (over all processes) for FAD."})
    eval_sample_seconds: float = field(default=2.0, metadata={"help": "Length of each sampled clip."})

    def __post_init__(self) -> None:
        _check(self.logging_steps >= 1, f"logging_steps={self.logging_steps}: must be >= 1")
        _check(self.eval_steps >= 0, f"eval_steps={self.eval_steps}: must be >= 0 (0 disables)")
        _check(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops={self.peak_tflops}: must be > 0")
        if self.fad_embedder is not None:
            from hf_audio_trainer.metrics.embedders import EMBEDDERS

            _check(
                self.fad_embedder in EMBEDDERS,
                f"fad_embedder={self.fad_embedder!r}: choose one of {sorted(EMBEDDERS)}",
            )
        _check(self.num_eval_samples >= 2, f"num_eval_samples={self.num_eval_samples}: FAD needs at least 2")
        _check(self.eval_sample_seconds > 0, f"eval_sample_seconds={self.eval_sample_seconds}: must be > 0")
        for name in self.trackers:
            _check(name in REPORT_TO, f"report_to: unknown tracker {name!r}; choose from {REPORT_TO} or 'none'")

    @property
    def trackers(self) -> list[str]:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names


@dataclass
class CheckpointConfig:
    """Checkpoints and resumption."""

    save_steps: int = field(default=100, metadata={"help": "Write a checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints (oldest go)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (in output_dir) or a checkpoint folder to resume from."}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Metric that picks the best/ checkpoint; unset: eval/loss_ema with --ema, else eval/loss."},
    )
    greater_is_better: bool = field(default=False, metadata={"help": "Whether a larger metric is better."})

    def __post_init__(self) -> None:
        _check(self.save_steps >= 1, f"save_steps={self.save_steps}: must be >= 1")
        _check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            f"save_total_limit={self.save_total_limit}: must be >= 1, or unset to keep all",
        )


@dataclass
class HubConfig:
    """Pushing the run to the Hugging Face Hub (uploads run in the background)."""

    push_to_hub: bool = field(default=False, metadata={"help": "Push the model (and model card) to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "The repo to push to, e.g. you/my-model."})
    hub_strategy: str = field(
        default="every_save",
        metadata={"help": "end (final model), every_save (model at every save) or checkpoint (also last-checkpoint/)."},
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo as private."})
    hub_token: str | None = field(
        default=None, repr=False, metadata={"help": "Hub token; unset: the logged-in one (never printed or saved)."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.hub import check_hub_args

        check_hub_args(self.push_to_hub, self.hub_model_id, self.hub_strategy)


def sections(config_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a run config class."""
    return {
        f.name: f.default_factory
        for f in dataclasses.fields(config_cls)
        if f.default_factory is not MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def stage_config(cls: type) -> type:
    """Make a stage's config class a dataclass whose flags each belong to exactly one of its sections: one name,
    one meaning. A flag in two sections is refused here, when the class is defined, so a flat key (a flag, a YAML
    key) can never silently set two settings."""
    cls = dataclass(cls)
    owners: dict[str, str] = {}
    for section, section_cls in sections(cls).items():
        for f in dataclasses.fields(section_cls):
            if f.name in owners:
                raise TypeError(
                    f"{cls.__name__}: flag --{f.name} is in both its {owners[f.name]} and {section} sections; "
                    "a flag belongs to one section of a stage (rename one)"
                )
            owners[f.name] = section
    return cls


@dataclass
class StageConfig:
    """What every stage's config shares: stage defaults, cross-section checks, a flat view for logs.

    `user_set` names the flags the user gave (on the command line, in their own `--config` file or in the dict a
    notebook passes); everything else is a default (the sections', the stage's, the recipe's YAML file). A value
    the user set is refused when it does not fit; a default that does not fit the run is adjusted, and `notes` says
    how, for the stage to print.
    """

    # the sections every stage shares; a stage adds its model's and its data's, and its own
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    user_set: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    # the flat defaults this run started from (stage defaults + the recipe's YAML); `max_steps` scales run lengths
    defaults: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    notes: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    # whether the stage can batch by duration (--max_tokens_per_batch): the code-sequence stages can
    batches_by_duration: ClassVar[bool] = False
    # flag -> value defaults of this stage that differ from the sections' own (subclasses override)
    stage_defaults: ClassVar[dict[str, Any]] = {}
    # (section, flag, the refusal when the user's value does not fit): settings counted in steps, which must fit in
    # the run
    run_length_settings: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("optim", "warmup_steps", "warmup_steps={value} is longer than max_steps={steps}: the learning rate would "
         "never leave warm-up; lower --warmup_steps or use --warmup_ratio"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        text = getattr(self, "text", None)
        if text is not None:  # flags of the text section mean nothing to a family that reads no text
            from hf_audio_trainer.families import FAMILIES

            given = [f"--{f.name}" for f in dataclasses.fields(text) if f.name in self.user_set]
            family = self.model.model_family
            _check(
                not given or FAMILIES[family].text_conditioned,
                f"{', '.join(given)}: the {family} family takes no text; use --model_family musicgen_text",
            )
        model = getattr(self, "model", None)
        for section in ("flow",):  # a family's own section: its flags mean nothing to another family
            own = getattr(self, section, None)
            given = [f"--{f.name}" for f in dataclasses.fields(own)] if own is not None else []
            given = [g for g in given if g[2:] in self.user_set]
            _check(
                not given or model.model_family == section,
                f"{', '.join(given)}: the {model.model_family if model else '?'} family does not read them; they "
                f"are the {section} family's (--model_family {section})",
            )
        _check(
            self.training.max_tokens_per_batch is None or self.batches_by_duration,
            f"--max_tokens_per_batch: the {type(self).__name__.removesuffix('Config').lower()} stage batches a fixed "
            "number of examples; use --per_device_train_batch_size",
        )
        curriculum = getattr(self, "curriculum", None)
        if getattr(getattr(self, "data", None), "streaming", False):
            _check(
                self.batches_by_duration and getattr(self, "finetune", None) is None,
                "--streaming is for pretraining on large data; fine-tune on a loaded dataset",
            )
            _check(
                curriculum.curriculum == "none"
                and curriculum.difficulty_method is None
                and curriculum.max_difficulty is None
                and not curriculum.high_quality_only,
                "--curriculum, --difficulty_method, --max_difficulty and --high_quality_only need every clip's scores "
                "before training, which a stream does not have; drop them with --streaming (or load the dataset)",
            )
            _check(
                self.training.max_tokens_per_batch is None,
                "--max_tokens_per_batch with --streaming is not supported; use --per_device_train_batch_size",
            )
        if curriculum is not None:
            _check(
                not curriculum.curriculum_segments or curriculum.curriculum not in ("none", "anti"),
                "--curriculum_segments grows the window with --curriculum's pacing; set --curriculum linear "
                "(or root, geometric, step)",
            )
            _check(
                curriculum.curriculum == "none" or curriculum.curriculum_segments
                or self.training.max_tokens_per_batch is None,
                "--max_tokens_per_batch with a difficulty --curriculum is not supported (the curriculum draws a "
                "fixed number of clips per step); use one of them, or --curriculum_segments",
            )  # fmt: skip
        if self.optim.learning_rate == 0:
            self.notes.append("learning_rate=0: the weights will not change (a check that the pipeline runs)")
        if self.training.max_steps > 0:
            self.fit_to_run(self.training.max_steps)

    def fit_to_run(self, max_steps: int) -> list[str]:
        """Check the settings counted in steps against the run's length (known here, or once the data sets it from
        --num_train_epochs): refuse one the user set, scale a default to the run. Returns the notes it added."""
        added = []
        default_run = self.defaults.get("max_steps", -1)
        for section, name, refusal in self.run_length_settings:
            value = getattr(getattr(self, section), name)
            if value <= max_steps:
                continue
            _check(name not in self.user_set, refusal.format(value=value, steps=max_steps))
            # the same fraction of this run as of the default one (a tenth when no default length is known)
            fitted = value * max_steps // default_run if 0 < value <= default_run else max_steps // 10
            setattr(getattr(self, section), name, fitted)
            of = f" of the default {default_run}" if 0 < value <= default_run else ""
            added.append(f"{name}: the default {value}{of} is longer than this {max_steps}-step run; using {fitted}")
        self.notes.extend(added)
        return added

    def to_flat_dict(self) -> dict[str, Any]:
        """All fields as one flat dict (flag name -> value), e.g. for tracker hyperparameters; never the token."""
        flat = {k: v for section in sections(type(self)) for k, v in dataclasses.asdict(getattr(self, section)).items()}
        flat.pop("hub_token", None)
        return flat


@stage_config
class PretrainConfig(StageConfig):
    """Everything a pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    batches_by_duration: ClassVar[bool] = True


@dataclass
class FinetuneOptions:
    """What a fine-tune changes about the pretrained model: frozen modules, or LoRA adapters through peft."""

    freeze_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated parameter-name patterns to freeze (fnmatch, e.g. 'model.decoder.layers.0.*')."
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names that get LoRA adapters; unset: the family's (musicgen: "
            "q_proj,k_proj,v_proj,out_proj,fc1,fc2; musicgen_text adds enc_to_dec_proj,lm_heads)."
        },
    )

    def __post_init__(self) -> None:
        _check(self.lora_r >= 1, f"lora_r={self.lora_r}: must be >= 1")
        _check(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha}: must be > 0")
        _check(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        _check(
            self.lora_target_modules is None or bool(self.lora_target_modules.strip()),
            "lora_target_modules must name at least one module",
        )


@stage_config
class FinetuneConfig(StageConfig):
    """A fine-tune: a pretrained model (folder or Hub id) on the high-quality rows, gentler optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    batches_by_duration: ClassVar[bool] = True

    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/finetune",
        "high_quality_only": True,
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "label_smoothing": 0.1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.model.model_name_or_path is not None,
            "finetune starts from a pretrained model: pass --model_name_or_path (a pretrain output folder or Hub id)",
        )


@dataclass
class PreferenceDataConfig:
    """Preference pairs: `chosen` / `rejected` audio (or `*_codes`), optionally a `prompt` to continue."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A save_to_disk folder or Hub dataset id with chosen/rejected (and prompt) columns; "
                  "unset: the embedded synthetic pairs (clean vs degraded continuations)."},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percent of pairs held out when the dataset has no validation split."}
    )
    synthetic_num_pairs: int = field(default=400, metadata={"help": "Pairs in the embedded synthetic dataset."})
    prompt_seconds: float = field(default=1.0, metadata={"help": "Prompt length of the synthetic pairs."})
    max_duration_seconds: float = field(default=10.0, metadata={"help": "Longer prompts+responses are cut."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Audio tokenizer; unset: the policy's own (MODEL/tokenizer)."}
    )

    def __post_init__(self) -> None:
        _check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        _check(self.synthetic_num_pairs >= 4, f"synthetic_num_pairs={self.synthetic_num_pairs}: must be >= 4")
        _check(self.prompt_seconds >= 0, f"prompt_seconds={self.prompt_seconds}: must be >= 0")
        _check(self.max_duration_seconds > 0, f"max_duration_seconds={self.max_duration_seconds}: must be > 0")


@dataclass
class DPOConfig:
    """The preference objective (TRL's names)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL tie to the reference model."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge or robust."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed label-noise rate for sigmoid (cDPO) and robust, in [0, 0.5)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference's log-probs once before training, so one model sits in memory."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; unset: a frozen copy of the starting policy."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.alignment import LOSS_TYPES

        _check(self.beta > 0, f"beta={self.beta}: must be > 0")
        _check(self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: choose one of {list(LOSS_TYPES)}")
        _check(0 <= self.label_smoothing < 0.5, f"label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        _check(
            self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
            f"label_smoothing applies to the sigmoid and robust losses, not {self.loss_type}",
        )


@stage_config
class AlignConfig(StageConfig):
    """Preference optimisation (DPO family) of a fine-tuned model against a frozen reference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    text: TextConfig = field(default_factory=TextConfig)  # musicgen_text: the prompts' text, guided samples
    flow: FlowConfig = field(default_factory=FlowConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/align",
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "dropout": 0.0,  # TRL disables dropout for DPO: policy and reference log-probs must be comparable
        "per_device_train_batch_size": 8,
        "metric_for_best_model": "eval/rewards/accuracies",
        "greater_is_better": True,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.model.model_name_or_path is not None,
            "align starts from a fine-tuned model: pass --model_name_or_path (a finetune output folder or Hub id)",
        )


def _flatten(values: dict[str, Any], section_names: dict[str, type], source: str) -> dict[str, Any]:
    """Accept both `{learning_rate: 1e-3}` and `{optim: {learning_rate: 1e-3}}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in section_names and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name for cls in section_names.values() for f in dataclasses.fields(cls)}
    for key in flat:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
    return flat


def config_from_dict(
    values: dict[str, Any], config_cls: type = PretrainConfig, source: str = "overrides", defaults: dict | None = None
):
    """Build a run config from a flat or sectioned dict (what the user set) over `defaults` (flat), validating every
    section."""
    section_names = sections(config_cls)
    user = _flatten(values, section_names, source)
    base = {**config_cls.stage_defaults, **(defaults or {})}
    flat = {**base, **user}
    built = {}
    for name, cls in section_names.items():
        own = {f.name for f in dataclasses.fields(cls)}
        built[name] = cls(**{k: v for k, v in flat.items() if k in own})
    return config_cls(**built, user_set=frozenset(user), defaults=base)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file, with a clear error when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"config file {path} does not exist; pass the path of a YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem}); fix the file at that line") from None
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values, not a {kind}")
    return values


def parse_config(argv: list[str] | None = None, config_cls: type = PretrainConfig, default_yaml: str | None = None):
    """Parse `--config file.yaml` plus flags (flags win) into a validated run config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    section_names = sections(config_cls)
    known = {f.name for cls in section_names.values() for f in dataclasses.fields(cls)}
    defaults, user_yaml = {}, {}
    if "--config" in argv:  # the user's own file replaces the recipe's
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        user_yaml = _flatten(load_yaml(argv[i + 1]), section_names, argv[i + 1])
        del argv[i : i + 2]
    elif default_yaml is not None:
        defaults = _flatten(load_yaml(default_yaml), section_names, str(default_yaml))
    parser = HfArgumentParser(list(section_names.values()), allow_abbrev=False)  # no silent prefix matches
    parser.set_defaults(**{**config_cls.stage_defaults, **defaults, **user_yaml})
    *parsed, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        flags = [a[2:].split("=")[0] for a in unknown if a.startswith("--")]
        hints = [f"--{m[0]}" for flag in flags if (m := difflib.get_close_matches(flag, known, n=1))]
        raise ConfigError(f"unknown arguments {unknown}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    given |= {name[3:] for name in given if name.startswith("no_") and name[3:] in known}  # --no_x sets x
    return config_cls(
        **dict(zip(section_names, parsed, strict=True)),
        user_set=frozenset((given & known) | set(user_yaml)),
        defaults={**config_cls.stage_defaults, **defaults},
    )


def resolve_config(config, config_cls: type = PretrainConfig):
    """Accept a config object, a dict of overrides or a YAML path (the notebook entry points use this)."""
    if isinstance(config, config_cls):
        return config
    if config is None:
        return config_cls()
    if isinstance(config, (str, os.PathLike)):  # the user's own file: every value in it is theirs
        return config_from_dict(load_yaml(config), config_cls, source=str(config))
    if isinstance(config, dict):
        return config_from_dict(config, config_cls)
    raise TypeError(f"config must be a {config_cls.__name__}, a dict of overrides or a YAML path, not {type(config)}")


# --------------------------------------------------------------------------------------------------------------------
# The codec stage: an EnCodec model trained with discriminators (recipes/codec.py)
# --------------------------------------------------------------------------------------------------------------------


def _int_list(value: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected comma-separated integers, e.g. 512,256,128") from None
    _check(bool(values) and all(v > 0 for v in values), f"{name}={value!r}: expected positive integers")
    return values


@dataclass
class CodecModelConfig:
    """The codec: a new EnCodec model of --codec_size, or an EncodecModel folder / Hub id to continue."""

    model_family: str = field(
        default="encodec_gan", metadata={"help": "The model family (see families.FAMILIES): encodec_gan."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An EncodecModel folder or Hub id to continue training; unset: a new codec."}
    )
    codec_size: str = field(default="tiny", metadata={"help": "Size of a new codec (see codec.CODEC_SIZES)."})
    codec_sample_rate: int | None = field(
        default=None,
        metadata={"help": "Sample rate (Hz); unset: the loaded model's, 16000 for a new one. Audio is resampled."},
    )
    num_codebooks: int = field(default=4, metadata={"help": "Residual quantizers (codebooks) of a new codec."})
    codebook_size: int = field(default=256, metadata={"help": "Entries per codebook of a new codec (a power of 2)."})
    codebook_decay: float = field(
        default=0.99, metadata={"help": "EMA decay of the codebook updates (EnCodec's 0.99)."}
    )
    dead_code_threshold: float = field(
        default=0.1, metadata={"help": "Entries whose EMA assignment count falls below this restart at a frame."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.codec import CODEC_SIZES

        _check_family(self.model_family, "encodec_gan")
        _check(self.codec_size in CODEC_SIZES, f"codec_size={self.codec_size!r}: choose one of {sorted(CODEC_SIZES)}")
        _check(
            self.codec_sample_rate is None or self.codec_sample_rate >= 1000,
            f"codec_sample_rate={self.codec_sample_rate}: must be >= 1000 Hz",
        )
        _check(self.num_codebooks >= 1, f"num_codebooks={self.num_codebooks}: must be >= 1")
        _check(
            self.codebook_size >= 2 and not self.codebook_size & (self.codebook_size - 1),
            f"codebook_size={self.codebook_size}: must be a power of 2 (EnCodec stores codes in log2(size) bits)",
        )
        _check(0 < self.codebook_decay < 1, f"codebook_decay={self.codebook_decay}: must be in (0, 1)")
        _check(self.dead_code_threshold >= 0, f"dead_code_threshold={self.dead_code_threshold}: must be >= 0")


@dataclass
class CodecDataConfig:
    """The audio a codec trains on, cut into fixed-length segments."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A folder of audio files, a save_to_disk folder or a Hub dataset id; unset: synthetic."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    audio_column: str = field(default="audio", metadata={"help": "Column holding the audio."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of train held out when the dataset has no validation split."}
    )
    synthetic_num_clips: int = field(default=2000, metadata={"help": "Clips in the embedded synthetic dataset."})
    segment_seconds: float = field(
        default=0.5, metadata={"help": "Training segment length (rounded down to whole codec frames)."}
    )
    max_eval_seconds: float = field(default=10.0, metadata={"help": "Validation clips are cut to this length."})

    def __post_init__(self) -> None:
        _check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        _check(self.synthetic_num_clips >= 2, f"synthetic_num_clips={self.synthetic_num_clips}: must be >= 2")
        _check(self.segment_seconds > 0, f"segment_seconds={self.segment_seconds}: must be > 0")
        _check(self.max_eval_seconds > 0, f"max_eval_seconds={self.max_eval_seconds}: must be > 0")


@dataclass
class DiscriminatorConfig:
    """The discriminators and their optimizer settings (the rest is shared with the generator's --optim flags)."""

    discriminators: str = field(
        default="msstft", metadata={"help": "Comma-separated: msstft (multi-scale STFT), mpd (multi-period)."}
    )
    stft_discriminator_n_ffts: str = field(
        default="512,256,128", metadata={"help": "FFT sizes of the multi-scale STFT discriminator's heads."}
    )
    mpd_periods: str = field(default="2,3,5,7,11", metadata={"help": "Periods of the multi-period discriminator."})
    discriminator_channels: int = field(default=8, metadata={"help": "Conv channels of each discriminator head."})
    discriminator_learning_rate: float | None = field(
        default=None, metadata={"help": "The discriminator's peak learning rate; unset: --learning_rate."}
    )
    discriminator_max_grad_norm: float | None = field(
        default=None, metadata={"help": "The discriminator's gradient clipping; unset: --max_grad_norm; 0 disables."}
    )

    def __post_init__(self) -> None:
        from hf_audio_trainer.adversarial import DISCRIMINATORS

        kinds = [k.strip() for k in self.discriminators.split(",") if k.strip()]
        _check(bool(kinds), "discriminators: name at least one of " + ", ".join(sorted(DISCRIMINATORS)))
        for kind in kinds:
            _check(kind in DISCRIMINATORS, f"discriminators: unknown {kind!r}; choose from {sorted(DISCRIMINATORS)}")
        _int_list(self.stft_discriminator_n_ffts, "stft_discriminator_n_ffts")
        _int_list(self.mpd_periods, "mpd_periods")
        _check(self.discriminator_channels >= 1, f"discriminator_channels={self.discriminator_channels}: must be >= 1")
        lr = self.discriminator_learning_rate
        _check(lr is None or lr > 0, f"discriminator_learning_rate={lr}: must be > 0")
        norm = self.discriminator_max_grad_norm
        _check(norm is None or norm >= 0, f"discriminator_max_grad_norm={norm}: must be >= 0 (0 disables clipping)")

    @property
    def heads(self) -> dict[str, list[int]]:
        """Discriminator kind -> its sizes (FFT sizes or periods)."""
        sizes = {"msstft": self.stft_discriminator_n_ffts, "mpd": self.mpd_periods}
        kinds = [k.strip() for k in self.discriminators.split(",") if k.strip()]
        return {kind: _int_list(sizes[kind], kind) for kind in kinds}


@dataclass
class AdversarialConfig:
    """The game: adversarial loss, when the discriminator starts, and the generator's loss weights (DAC's)."""

    adversarial_loss_type: str = field(
        default="lsgan", metadata={"help": "lsgan (HiFi-GAN; the balanced one on the default run) or hinge (EnCodec)."}
    )
    discriminator_start_step: int = field(
        default=0, metadata={"help": "Train only on reconstruction until this step, then add the discriminator."}
    )
    mel_loss_weight: float = field(default=15.0, metadata={"help": "Weight of the multi-scale log-mel L1."})
    mel_loss_n_ffts: str = field(default="256,512,1024", metadata={"help": "STFT sizes of the mel loss."})
    waveform_loss_weight: float = field(default=0.1, metadata={"help": "Weight of the waveform L1."})
    adversarial_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the generator's GAN loss."})
    feature_matching_loss_weight: float = field(default=2.0, metadata={"help": "Weight of feature matching."})
    commitment_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the VQ commitment loss."})

    def __post_init__(self) -> None:
        from hf_audio_trainer.adversarial import ADVERSARIAL_LOSSES

        _check(
            self.adversarial_loss_type in ADVERSARIAL_LOSSES,
            f"adversarial_loss_type={self.adversarial_loss_type!r}: choose one of {sorted(ADVERSARIAL_LOSSES)}",
        )
        _check(
            self.discriminator_start_step >= 0,
            f"discriminator_start_step={self.discriminator_start_step}: must be >= 0",
        )
        for name in (
            "mel_loss_weight", "waveform_loss_weight", "adversarial_loss_weight", "feature_matching_loss_weight",
            "commitment_loss_weight",
        ):  # fmt: skip
            value = getattr(self, name)
            _check(value >= 0, f"{name}={value}: loss weights must be >= 0 (0 switches the term off)")
        _int_list(self.mel_loss_n_ffts, "mel_loss_n_ffts")

    @property
    def weights(self):
        from hf_audio_trainer.codec import LossWeights

        return LossWeights(
            mel=self.mel_loss_weight,
            waveform=self.waveform_loss_weight,
            adversarial=self.adversarial_loss_weight,
            feature_matching=self.feature_matching_loss_weight,
            commitment=self.commitment_loss_weight,
        )


@stage_config
class CodecConfig(StageConfig):
    """Train an EnCodec-style codec with discriminators; its output folder is a tokenizer for pretrain."""

    model: CodecModelConfig = field(default_factory=CodecModelConfig)
    data: CodecDataConfig = field(default_factory=CodecDataConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/codec",
        "learning_rate": 1e-3,
        "adam_beta1": 0.8,  # optim.GAN_BETAS: a short memory keeps up with the opponent
        "adam_beta2": 0.99,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant_with_warmup",
        "per_device_train_batch_size": 8,
        "fad_embedder": "mel",
        "num_eval_samples": 100,
        "metric_for_best_model": "eval/mel_distance",
    }

    run_length_settings: ClassVar[tuple[tuple[str, str, str], ...]] = (
        *StageConfig.run_length_settings,
        ("adversarial", "discriminator_start_step", "discriminator_start_step={value} is after max_steps={steps}: "
         "the discriminator would never train; lower --discriminator_start_step or raise --max_steps (equal to "
         "max_steps: a reconstruction-only run)"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.model_name_or_path is None:  # the sample rate is known now; a loaded model is checked at start
            from hf_audio_trainer.codec import CODEC_SIZES, DEFAULT_SAMPLE_RATE

            hop = math.prod(CODEC_SIZES[self.model.codec_size]["upsampling_ratios"])
            check_segment(self, self.model.codec_sample_rate or DEFAULT_SAMPLE_RATE, hop)


def check_segment(cfg: CodecConfig, sample_rate: int, hop_length: int) -> None:
    """Training segments must hold the largest STFT window of the discriminator and of the mel loss."""
    from hf_audio_trainer.adversarial import min_audio_samples
    from hf_audio_trainer.codec import segment_samples

    samples = segment_samples(cfg.data.segment_seconds, sample_rate, hop_length)
    windows = {
        "the STFT discriminator's largest n_fft": min_audio_samples(cfg.discriminator.heads),
        "the mel loss's largest n_fft": max(_int_list(cfg.adversarial.mel_loss_n_ffts, "mel_loss_n_ffts")),
    }
    for what, needed in windows.items():
        _check(
            samples >= needed,
            f"segment_seconds={cfg.data.segment_seconds} gives {samples} samples at {sample_rate} Hz, shorter than "
            f"{what} ({needed}); raise --segment_seconds to at least {needed / sample_rate:g} or use smaller FFT sizes",
        )
