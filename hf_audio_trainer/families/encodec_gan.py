"""An EnCodec codec (transformers `EncodecModel`) trained against discriminators: the `codec` stage's family.

The generator is the codec with a trainable quantizer (`codec.CodecGenerator`), the discriminators multi-scale STFT
and multi-period heads (`adversarial.Discriminators`); they train on random fixed-length segments of the clips, a
discriminator update then a generator update per step (`adversarial.AdversarialStep`), each with its own optimizer,
schedule, clipping and fp16 loss scale. The export is a plain `EncodecModel` that is also an audio tokenizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import EncodecConfig, EncodecModel

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.adversarial import (
    ADVERSARIAL_LOSSES,
    AdversarialConfig,
    AdversarialStep,
    DiscriminatorConfig,
    Discriminators,
    Player,
    int_list,
    min_audio_samples,
)
from hf_audio_trainer.codec import (
    CODEC_SIZES,
    DEFAULT_SAMPLE_RATE,
    CodecGenerator,
    CodecObjective,
    LossWeights,
    MultiScaleMelDistance,
    ReconstructionEvaluator,
    build_codec,
    init_codebooks,
    new_codec_config,
    num_codebooks_of,
    segment_samples,
    segment_stream,
)
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families.base import Checkpoints, Family
from hf_audio_trainer.optim import build_optimization, build_optimizer, build_scheduler, scale_lr

DISCRIMINATOR_DIR = "discriminator"
# two models with their own optimizers need DDP's per-module wrapping; sharded engines (FSDP, DeepSpeed) wrap one
BACKENDS = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_MLU", "MULTI_NPU", "MULTI_HPU")


@dataclass
class CodecModelConfig:
    """The codec: a new EnCodec model of --codec_size, or an EncodecModel folder / Hub id to continue."""

    shapes_model: ClassVar[bool] = True

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
        check(self.codec_size in CODEC_SIZES, f"codec_size={self.codec_size!r}: choose one of {sorted(CODEC_SIZES)}")
        check(
            self.codec_sample_rate is None or self.codec_sample_rate >= 1000,
            f"codec_sample_rate={self.codec_sample_rate}: must be >= 1000 Hz",
        )
        check(self.num_codebooks >= 1, f"num_codebooks={self.num_codebooks}: must be >= 1")
        check(
            self.codebook_size >= 2 and not self.codebook_size & (self.codebook_size - 1),
            f"codebook_size={self.codebook_size}: must be a power of 2 (EnCodec stores codes in log2(size) bits)",
        )
        check(0 < self.codebook_decay < 1, f"codebook_decay={self.codebook_decay}: must be in (0, 1)")
        check(self.dead_code_threshold >= 0, f"dead_code_threshold={self.dead_code_threshold}: must be >= 0")


@dataclass
class CodecDataConfig:
    """The audio a codec trains on, cut into fixed-length segments."""

    shapes_model: ClassVar[bool] = True

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
        check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        check(self.synthetic_num_clips >= 2, f"synthetic_num_clips={self.synthetic_num_clips}: must be >= 2")
        check(self.segment_seconds > 0, f"segment_seconds={self.segment_seconds}: must be > 0")
        check(self.max_eval_seconds > 0, f"max_eval_seconds={self.max_eval_seconds}: must be > 0")


def check_segment(cfg, sample_rate: int, hop_length: int) -> None:
    """Training segments must hold the largest STFT window of the discriminator and of the mel loss."""
    samples = segment_samples(cfg.data.segment_seconds, sample_rate, hop_length)
    windows = {
        "the STFT discriminator's largest n_fft": min_audio_samples(cfg.discriminator.heads),
        "the mel loss's largest n_fft": max(int_list(cfg.adversarial.mel_loss_n_ffts, "mel_loss_n_ffts")),
    }
    for what, needed in windows.items():
        check(
            samples >= needed,
            f"segment_seconds={cfg.data.segment_seconds} gives {samples} samples at {sample_rate} Hz, shorter than "
            f"{what} ({needed}); raise --segment_seconds to at least {needed / sample_rate:g} or use smaller FFT sizes",
        )


def check_config(cfg) -> None:
    """What spans the codec's sections: a new codec's sample rate is known now, so its segments are checked before
    any work (a loaded one's at start, in `preprocess`)."""
    if cfg.model.model_name_or_path is None:
        hop = math.prod(CODEC_SIZES[cfg.model.codec_size]["upsampling_ratios"])
        check_segment(cfg, cfg.model.codec_sample_rate or DEFAULT_SAMPLE_RATE, hop)


@dataclass
class CodecData:
    """The clips, the segment length the codec trains on, the validation clips it reconstructs, and the run's
    per-network fp16 loss scalers (None without fp16)."""

    train: Dataset
    validation: Dataset
    sample_rate: int
    hop_length: int
    length: int
    mel: MultiScaleMelDistance
    scalers: list = field(default_factory=lambda: [None, None])


def codec_config(cfg) -> EncodecConfig:
    """The config of the codec this run trains: the loaded model's, or a new one of --codec_size."""
    m = cfg.model
    if m.model_name_or_path is None:
        rate = m.codec_sample_rate or DEFAULT_SAMPLE_RATE
        return new_codec_config(m.codec_size, rate, m.num_codebooks, m.codebook_size)
    try:
        return EncodecConfig.from_pretrained(m.model_name_or_path)
    except OSError as err:
        raise ConfigError(
            f"could not load an EncodecModel from {m.model_name_or_path!r}: pass a folder with config.json and "
            f"model.safetensors or a cached Hub id ({err})"
        ) from err


def preprocess(run, clips: dict[str, Dataset]) -> CodecData:
    """The raw clips (segments are cut as they are drawn), sized by the codec's sample rate and hop."""
    cfg = run.cfg
    config = codec_config(cfg)
    sample_rate, hop = config.sampling_rate, config.hop_length
    check_segment(cfg, sample_rate, hop)
    length = segment_samples(cfg.data.segment_seconds, sample_rate, hop)
    mel = MultiScaleMelDistance(sample_rate, [int(n) for n in cfg.adversarial.mel_loss_n_ffts.split(",")])
    return CodecData(clips["train"], clips["validation"], sample_rate, hop, length, mel.to(run.accelerator.device))


def first_segments(train_set: Dataset, audio_column: str, sample_rate: int, length: int, count: int = 64):
    """The first clips' opening segments [count, 1, length]: the same on every process (codebook initialisation)."""
    values = train_set.select(range(min(count, len(train_set))))[audio_column]
    waves = [decode_audio(v, sample_rate, where=f"train row {i}")[:length] for i, v in enumerate(values)]
    return torch.from_numpy(np.stack([np.pad(w, (0, length - len(w))) for w in waves]))[:, None]


def build_model(run, data: CodecData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    cfg, m = run.cfg, run.cfg.model
    codec = build_codec(m.model_name_or_path, m.codec_size, m.codec_sample_rate, m.num_codebooks, m.codebook_size)
    generator = CodecGenerator(codec, m.codebook_decay, m.dead_code_threshold)
    if m.model_name_or_path is None:
        segments = first_segments(data.train, cfg.data.audio_column, data.sample_rate, data.length)
        init_codebooks(generator, segments, seed=cfg.training.seed)
    discriminator = Discriminators(cfg.discriminator.heads, cfg.discriminator.discriminator_channels)
    return {"generator": generator, "discriminator": discriminator}


def optimizers(run, data: CodecData, models, global_batch: int, max_steps: int):
    """The generator's from the optim section; the discriminator's with its own lr, its schedule starting with its
    first step."""
    cfg, o, dc = run.cfg, run.cfg.optim, run.cfg.discriminator
    if o.optim == "sophia":
        raise ConfigError("--optim sophia needs the language-model loop's Hessian pass; use adamw (or lion, ...) here")
    g_optimizer, g_scheduler = build_optimization(o, run.accelerator, models["generator"], global_batch, max_steps)
    d_lr = dc.discriminator_learning_rate or o.learning_rate
    if o.scale_lr is not None:
        d_lr = scale_lr(d_lr, o.base_batch_size, global_batch, o.scale_lr)
    d_optimizer = build_optimizer(
        models["discriminator"], o.optim, weight_decay=o.weight_decay, lr=d_lr, betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
    )  # fmt: skip
    start_d = cfg.adversarial.discriminator_start_step
    d_warmup = o.warmup_steps or math.ceil(o.warmup_ratio * (max_steps - start_d))
    d_steps = max(max_steps - start_d, 1)
    d_scheduler = build_scheduler(d_optimizer, o.lr_scheduler_type, min(d_warmup, d_steps), d_steps)
    return [g_optimizer, d_optimizer], [g_scheduler, d_scheduler]


def prepare(run, data: CodecData, models, optimizers, schedulers):
    """Both networks under DDP (or on one device), each with its own fp16 loss scale."""
    accelerator = run.accelerator
    if accelerator.distributed_type.name not in BACKENDS:
        raise ConfigError(
            f"the codec recipe runs on one device or under DDP; {accelerator.distributed_type.name} is not supported "
            "(use accelerate_configs/multi_gpu.yaml)"
        )
    if accelerator.mixed_precision == "fp16":
        # one loss scale per network: a discriminator overflow must not skip the generator's step or shrink its
        # scale. accelerate holds a single scaler for all models, so it is taken out before prepare and each
        # network gets its own (their states go into the checkpoint's JSON: accelerate would pickle custom objects)
        accelerator.scaler = None
        data.scalers = [torch.amp.GradScaler(accelerator.device.type) for _ in range(2)]
    generator, discriminator, g_opt, d_opt, g_sched, d_sched = accelerator.prepare(
        models["generator"], models["discriminator"], *optimizers, *schedulers
    )
    return {"generator": generator, "discriminator": discriminator}, [g_opt, d_opt], [g_sched, d_sched]


def loss(run, data: CodecData, models) -> CodecObjective:
    a = run.cfg.adversarial
    weights = LossWeights(
        mel=a.mel_loss_weight, waveform=a.waveform_loss_weight, adversarial=a.adversarial_loss_weight,
        feature_matching=a.feature_matching_loss_weight, commitment=a.commitment_loss_weight,
    )  # fmt: skip
    return CodecObjective(
        run.accelerator, models["generator"], models["discriminator"], data.mel,
        ADVERSARIAL_LOSSES[a.adversarial_loss_type], weights,
    )  # fmt: skip


def step(run, data: CodecData, models, optimizers, schedulers, objective: CodecObjective) -> AdversarialStep:
    cfg, accelerator = run.cfg, run.accelerator
    o, dc = cfg.optim, cfg.discriminator
    generator, discriminator = models["generator"], models["discriminator"]

    def update_codebooks(stepped: bool) -> None:  # once per generator step, from the whole step's assignments
        accelerator.unwrap_model(generator).update_codebooks(accelerator, stepped)

    d_norm = o.max_grad_norm if dc.discriminator_max_grad_norm is None else dc.discriminator_max_grad_norm
    players = (
        Player("g", generator, optimizers[0], schedulers[0], o.max_grad_norm, data.scalers[0], update_codebooks),
        Player("d", discriminator, optimizers[1], schedulers[1], d_norm, data.scalers[1]),
    )
    return AdversarialStep(
        accelerator, *players, objective.generator_loss, objective.discriminator_loss,
        cfg.adversarial.discriminator_start_step,
    )  # fmt: skip


def batches(run, data: CodecData, models, sampler, start_step: int):
    t, d = run.cfg.training, run.cfg.data
    return segment_stream(
        data.train, sampler, t.per_device_train_batch_size, data.length, data.sample_rate, d.audio_column, t.seed,
        start_step,
    )  # fmt: skip


def evaluate(run, data: CodecData, models):
    """Reconstruction of whole validation clips: mel distance, SI-SDR, waveform L1 and FAD (suffix "_ema" under the
    EMA), with a few clips saved to listen to."""
    cfg, accelerator = run.cfg, run.accelerator
    lg, d = cfg.samples, cfg.data
    max_eval = int(d.max_eval_seconds * data.sample_rate)
    values = data.validation.select(range(min(lg.num_eval_samples, len(data.validation))))[d.audio_column]
    waves = [decode_audio(v, data.sample_rate, where=f"validation row {i}")[:max_eval] for i, v in enumerate(values)]
    evaluator = ReconstructionEvaluator(
        accelerator, waves, data.sample_rate, data.mel, run.out, lg.fad_embedder, lg.fad_embedder_model
    )
    generator = models["generator"]

    def evaluate_weights(step: int, suffix: str, sample: bool) -> dict[str, float]:
        return evaluator(accelerator.unwrap_model(generator), step, suffix=suffix)

    return evaluate_weights


def save_discriminator(discriminator: torch.nn.Module, cfg, folder: Path) -> None:
    """discriminator/model.safetensors plus the settings that rebuild it (`adversarial.Discriminators`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in discriminator.state_dict().items()}, str(folder / "model.safetensors"))
    settings = {"heads": cfg.discriminator.heads, "channels": cfg.discriminator.discriminator_channels}
    (folder / "config.json").write_text(json.dumps(settings, indent=2))


def export(run, data: CodecData, models, folder: Path) -> None:
    """A plain EncodecModel (its codebooks are its own EMA-trained buffers, which a weight EMA leaves as they are)
    with the tokenizer_config.json that makes it an audio tokenizer, and the discriminator beside it."""
    accelerator = run.accelerator
    generator = accelerator.unwrap_model(models["generator"])

    def extras(tmp: Path) -> None:
        # EncodecTokenizer owns the tokenizer_config.json format (it rewrites the same weights beside it); it puts
        # the model in eval mode, which a mid-run export (a Hub push) must undo
        was_training = generator.training
        EncodecTokenizer(generator.codec).save_pretrained(tmp)
        generator.train(was_training)
        save_discriminator(accelerator.unwrap_model(models["discriminator"]), run.cfg, tmp / DISCRIMINATOR_DIR)

    ckpt.save_final_model(accelerator, generator.codec, folder, extras)


def checkpoint_state(data: CodecData) -> dict:
    return {"loss_scalers": [s.state_dict() for s in data.scalers if s]}  # both networks' under fp16


def load_checkpoint_state(data: CodecData, state: dict, where: Path) -> None:
    saved = state.get("loss_scalers", [])
    scalers = [s for s in data.scalers if s]
    if len(saved) != len(scalers):
        raise ConfigError(f"{where} was saved with another --mixed_precision (fp16 or not); resume with the same")
    for scaler, values in zip(scalers, saved, strict=True):
        scaler.load_state_dict(values)


def describe(data: CodecData, models) -> str:
    generator, discriminator = models["generator"], models["discriminator"]
    codec = generator.codec
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return (
        f"{len(data.train)} train / {len(data.validation)} validation clips; codec {count(generator):,} parameters "
        f"({num_codebooks_of(codec)} codebooks x {codec.config.codebook_size}, {codec.config.frame_rate} frames/s), "
        f"discriminator {count(discriminator):,}; segments of {data.length} samples"
    )


ENCODEC_GAN = Family(
    name="encodec_gan",
    stages=("codec",),
    preprocess=preprocess,
    build_model=build_model,
    batches=batches,
    loss=loss,
    evaluate=evaluate,
    flops_per_item=lambda models, data: 0.0,
    export=export,
    load_export=EncodecModel.from_pretrained,
    describe=describe,
    headline=("eval/mel_distance", "validation mel distance"),
    optimizers=optimizers,
    prepare=prepare,
    step=step,
    checkpoint_state=checkpoint_state,
    load_checkpoint_state=load_checkpoint_state,
    sections={
        "model": CodecModelConfig,
        "data": CodecDataConfig,
        "discriminator": DiscriminatorConfig,
        "adversarial": AdversarialConfig,
    },
    check_config=check_config,
    checkpoints=Checkpoints.of_class("EncodecModel"),
)
