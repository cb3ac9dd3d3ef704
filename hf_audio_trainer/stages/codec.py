"""The codec stage: an EnCodec model trained against discriminators; its output folder is a pretrain tokenizer."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import save_file

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.adversarial import (
    ADVERSARIAL_LOSSES,
    AdversarialSettings,
    Discriminators,
    Player,
    train_adversarial,
)
from hf_audio_trainer.checkpoint import Checkpointer, prepare_output_dir
from hf_audio_trainer.codec import (
    CodecGenerator,
    CodecObjective,
    MultiScaleMelDistance,
    ReconstructionEvaluator,
    build_codec,
    init_codebooks,
    num_codebooks_of,
    segment_samples,
    segment_stream,
)
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.config import (
    CodecConfig,
    check_segment,
    resolve_config,
)
from hf_audio_trainer.data.audio import decode_audio, load_audio_dataset
from hf_audio_trainer.distributed import stage_accelerator
from hf_audio_trainer.ema import build_ema
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.hub import model_card_writer, start_pusher
from hf_audio_trainer.optim import build_optimization, build_optimizer, build_scheduler, scale_lr
from hf_audio_trainer.stages.common import (
    RunResult,
    run_and_finish,
    shuffled_sampler,
)
from hf_audio_trainer.trackers import read_metrics

DISCRIMINATOR_DIR = "discriminator"


# two models with their own optimizers need DDP's per-module wrapping; sharded engines (FSDP, DeepSpeed) wrap one
CODEC_BACKENDS = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_MLU", "MULTI_NPU", "MULTI_HPU")


def train_codec(config: CodecConfig | dict | str | None = None) -> RunResult:
    """Train an EnCodec-style codec with discriminators (an audio tokenizer for pretrain); notebook-ready."""
    cfg = resolve_config(config, CodecConfig)
    with stage_accelerator(cfg) as accelerator:
        return _train_codec(cfg, accelerator)


def first_segments(train_set: Dataset, audio_column: str, sample_rate: int, length: int, count: int = 64):
    """The first clips' opening segments [count, 1, length]: the same on every process (codebook initialisation)."""
    values = train_set.select(range(min(count, len(train_set))))[audio_column]
    waves = [decode_audio(v, sample_rate, where=f"train row {i}")[:length] for i, v in enumerate(values)]
    return torch.from_numpy(np.stack([np.pad(w, (0, length - len(w))) for w in waves]))[:, None]


def save_discriminator(discriminator: torch.nn.Module, cfg: CodecConfig, folder: Path) -> None:
    """discriminator/model.safetensors plus the settings that rebuild it (`adversarial.Discriminators`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in discriminator.state_dict().items()}, str(folder / "model.safetensors"))
    settings = {"heads": cfg.discriminator.heads, "channels": cfg.discriminator.discriminator_channels}
    (folder / "config.json").write_text(json.dumps(settings, indent=2))


def _train_codec(cfg: CodecConfig, accelerator: Accelerator) -> RunResult:
    t, d, o, lg, dc = cfg.training, cfg.data, cfg.optim, cfg.logging, cfg.discriminator
    out = Path(t.output_dir)
    if accelerator.distributed_type.name not in CODEC_BACKENDS:
        raise ConfigError(
            f"the codec recipe runs on one device or under DDP; {accelerator.distributed_type.name} is not supported "
            "(use accelerate_configs/multi_gpu.yaml)"
        )
    if o.optim == "sophia":
        raise ConfigError("--optim sophia needs the language-model loop's Hessian pass; use adamw (or lion, ...) here")
    resume = prepare_output_dir(cfg, accelerator)
    pusher = start_pusher(cfg, accelerator)
    codec = build_codec(
        cfg.model.model_name_or_path, cfg.model.codec_size, cfg.model.codec_sample_rate, cfg.model.num_codebooks,
        cfg.model.codebook_size,
    )  # fmt: skip
    sample_rate, hop = codec.config.sampling_rate, codec.config.hop_length
    check_segment(cfg, sample_rate, hop)
    length = segment_samples(d.segment_seconds, sample_rate, hop)
    with accelerator.main_process_first():
        raw = load_audio_dataset(
            d.dataset_name, audio_column=d.audio_column, validation_split_percentage=d.validation_split_percentage,
            seed=t.seed, dataset_config_name=d.dataset_config_name, synthetic_num_clips=d.synthetic_num_clips,
        )  # fmt: skip
    train_set, val_set = raw["train"], raw["validation"]
    global_batch, sampler, max_steps = shuffled_sampler(cfg, accelerator, len(train_set))
    start_d = cfg.adversarial.discriminator_start_step  # fitted to the run by shuffled_sampler

    generator = CodecGenerator(codec, cfg.model.codebook_decay, cfg.model.dead_code_threshold)
    if cfg.model.model_name_or_path is None:
        init_codebooks(generator, first_segments(train_set, d.audio_column, sample_rate, length), seed=t.seed)
    discriminator = Discriminators(dc.heads, dc.discriminator_channels)
    g_optimizer, g_scheduler = build_optimization(cfg, accelerator, generator, global_batch, max_steps)
    d_lr = dc.discriminator_learning_rate or o.learning_rate
    if o.scale_lr is not None:
        d_lr = scale_lr(d_lr, o.base_batch_size, global_batch, o.scale_lr)
    d_optimizer = build_optimizer(
        discriminator, o.optim, weight_decay=o.weight_decay, lr=d_lr, betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
    )  # fmt: skip
    # the discriminator's schedule starts with its first step
    d_warmup = o.warmup_steps or math.ceil(o.warmup_ratio * (max_steps - start_d))
    d_steps = max(max_steps - start_d, 1)
    d_scheduler = build_scheduler(d_optimizer, o.lr_scheduler_type, min(d_warmup, d_steps), d_steps)
    scalers = [None, None]
    if accelerator.mixed_precision == "fp16":
        # one loss scale per network: a discriminator overflow must not skip the generator's step or shrink its
        # scale. accelerate holds a single scaler for all models, so it is taken out before prepare and each
        # network gets its own (their states go into the checkpoint's JSON: accelerate would pickle custom objects)
        accelerator.scaler = None
        scalers = [torch.amp.GradScaler(accelerator.device.type) for _ in range(2)]
    generator, discriminator, g_optimizer, d_optimizer, g_scheduler, d_scheduler = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer, g_scheduler, d_scheduler
    )
    ema = build_ema(cfg, accelerator.unwrap_model(generator))

    def export(folder: Path, use_ema: bool) -> None:
        unwrapped = accelerator.unwrap_model(generator)

        def extras(tmp: Path) -> None:
            # EncodecTokenizer owns the tokenizer_config.json format (it rewrites the same weights beside it); it puts
            # the model in eval mode, which a mid-run export (a Hub push) must undo
            was_training = unwrapped.training
            EncodecTokenizer(unwrapped.codec).save_pretrained(tmp)
            unwrapped.train(was_training)
            save_discriminator(accelerator.unwrap_model(discriminator), cfg, tmp / DISCRIMINATOR_DIR)

        with ema.average_parameters(unwrapped) if use_ema else contextlib.nullcontext():
            # a plain EncodecModel (its codebooks are its own EMA-trained buffers, which the weight EMA leaves as is)
            ckpt.save_final_model(accelerator, unwrapped.codec, folder, extras)

    def extra_state(step: int) -> dict:  # the data position and, under fp16, both loss scales
        return {"sampler": sampler.state_at_step(step), "loss_scalers": [s.state_dict() for s in scalers if s]}

    checkpointer = Checkpointer(
        cfg, accelerator, global_batch, max_steps, save_extras=lambda folder: None, extra_state=extra_state, ema=ema,
        pusher=pusher, export=export,
        card=model_card_writer(cfg, "codec", cfg.model.model_name_or_path, [d.dataset_name or "synthetic"]),
    )  # fmt: skip
    start_step = 0
    if resume is not None:
        start_step = checkpointer.resume(resume)
        saved = json.loads((resume / ckpt.STATE_FILE).read_text()).get("loss_scalers", [])
        if len(saved) != sum(s is not None for s in scalers):
            raise ConfigError(f"{resume} was saved with another --mixed_precision (fp16 or not); resume with the same")
        for scaler, state in zip([s for s in scalers if s], saved, strict=True):
            scaler.load_state_dict(state)
    accelerator.init_trackers("codec", config=cfg.to_flat_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    accelerator.print(
        f"{len(train_set)} train / {len(val_set)} validation clips; codec {count(generator):,} parameters "
        f"({num_codebooks_of(codec)} codebooks x {codec.config.codebook_size}, {codec.config.frame_rate} frames/s), "
        f"discriminator {count(discriminator):,}; segments of {length} samples; global batch {global_batch}; "
        f"{max_steps} steps, discriminator from step {start_d}"
    )

    batches = segment_stream(
        train_set, sampler, t.per_device_train_batch_size, length, sample_rate, d.audio_column, t.seed, start_step
    )
    a = cfg.adversarial
    mel = MultiScaleMelDistance(sample_rate, [int(n) for n in a.mel_loss_n_ffts.split(",")]).to(accelerator.device)
    objective = CodecObjective(
        accelerator, generator, discriminator, mel, ADVERSARIAL_LOSSES[a.adversarial_loss_type], a.weights
    )
    max_eval = int(d.max_eval_seconds * sample_rate)
    val_audio = val_set.select(range(min(lg.num_eval_samples, len(val_set))))[d.audio_column]
    val_waves = [decode_audio(v, sample_rate, where=f"validation row {i}")[:max_eval] for i, v in enumerate(val_audio)]
    evaluator = ReconstructionEvaluator(
        accelerator, val_waves, sample_rate, mel, out, lg.fad_embedder, lg.fad_embedder_model
    )

    def evaluate(step: int) -> dict[str, float]:
        unwrapped = accelerator.unwrap_model(generator)
        results = evaluator(unwrapped, step)
        if ema is not None:
            with ema.average_parameters(unwrapped):
                results.update(evaluator(unwrapped, step, suffix="_ema"))
        checkpointer.record(step, results)
        return results

    settings = AdversarialSettings(
        max_steps=max_steps, gradient_accumulation_steps=t.gradient_accumulation_steps,
        discriminator_start_step=start_d, logging_steps=lg.logging_steps, eval_steps=lg.eval_steps,
        save_steps=cfg.checkpoint.save_steps, eval_on_start=lg.eval_on_start,
        max_consecutive_skips=t.max_consecutive_skips,
    )  # fmt: skip
    d_norm = o.max_grad_norm if dc.discriminator_max_grad_norm is None else dc.discriminator_max_grad_norm

    def update_codebooks(stepped: bool) -> None:  # once per generator step, from the whole step's assignments
        accelerator.unwrap_model(generator).update_codebooks(accelerator, stepped)

    players = (
        Player("g", generator, g_optimizer, g_scheduler, o.max_grad_norm, scalers[0], update_codebooks),
        Player("d", discriminator, d_optimizer, d_scheduler, d_norm, scalers[1]),
    )

    def run_loop() -> dict[str, float]:
        return train_adversarial(
            accelerator, *players, batches, objective.generator_loss, objective.discriminator_loss, settings,
            start_step, evaluate, checkpointer.save, ema,
        )  # fmt: skip

    advice = "a lower --learning_rate or --discriminator_learning_rate, or a smaller --max_grad_norm"
    result = run_and_finish(cfg, accelerator, checkpointer, max_steps, run_loop, advice)
    if result.preempted:
        return result
    evals = [(m["step"], m["eval/mel_distance"]) for m in read_metrics(out) if "eval/mel_distance" in m]
    if len(evals) > 1:
        (s0, first), (s1, last) = evals[0], evals[-1]
        accelerator.print(f"validation mel distance {first:.4f} at step {s0} -> {last:.4f} at step {s1}")
    return result
