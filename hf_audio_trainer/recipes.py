"""The training stages as functions: build the pieces from a config, run the loop, return what was made."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
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
from hf_audio_trainer.alignment import (
    DPOObjective,
    PreferenceCollator,
    precompute_reference_logps,
    tokenize_preferences,
)
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
from hf_audio_trainer.config import (
    AlignConfig,
    CodecConfig,
    FinetuneConfig,
    PretrainConfig,
    check_segment,
    resolve_config,
)
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.audio import decode_audio, load_audio_dataset
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches, tokenize_dataset
from hf_audio_trainer.data.preferences import (
    check_preference_columns,
    drop_identical_pairs,
    load_preference_dataset,
    make_synthetic_preferences,
)
from hf_audio_trainer.difficulty import score_difficulty
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.loop import evaluate_loss, evaluate_metrics
from hf_audio_trainer.models import adapt_for_finetuning, build_model, lm_loss, num_parameters
from hf_audio_trainer.optim import build_optimizer, build_scheduler, scale_lr
from hf_audio_trainer.run import (
    Checkpointer,
    RunResult,
    build_ema,
    build_optimization,
    fit_run_length,
    loop_settings,
    model_card_writer,
    prepare,
    prepare_frozen,
    prepare_output_dir,
    run_and_finish,
    shuffled_sampler,
    stage_accelerator,
    start_pusher,
    train_and_finish,
)
from hf_audio_trainer.samples import SampleEvaluator
from hf_audio_trainer.system import training_flops_per_token
from hf_audio_trainer.tokenizers import EncodecTokenizer, MelKMeansTokenizer, load_audio_tokenizer
from hf_audio_trainer.trackers import read_metrics

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


def align(config: AlignConfig | dict | str | None = None) -> RunResult:
    """Preference-optimise (DPO family) a fine-tuned model against a frozen reference; notebook-ready."""
    cfg = resolve_config(config, AlignConfig)
    with stage_accelerator(cfg) as accelerator:
        return _align(cfg, accelerator)


def folder_fingerprint(folder: str) -> str:
    """A hash of every file in a folder (two tokenizers are the same when their saved files are)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def prepare_preferences(cfg: AlignConfig, accelerator: Accelerator, tokenizer):
    """Load the pairs (embedded synthetic ones by default), check them, drop identical pairs, tokenize both splits."""
    d = cfg.data
    with accelerator.main_process_first():
        if d.dataset_name is None:
            pairs = make_synthetic_preferences(d.synthetic_num_pairs, cfg.training.seed, d.prompt_seconds)
        else:
            pairs = load_preference_dataset(
                d.dataset_name, d.dataset_config_name, d.validation_split_percentage, cfg.training.seed
            )
        check_preference_columns(pairs)
        splits = {}
        for name in ("train", "validation"):
            kept, dropped = drop_identical_pairs(pairs[name])
            if dropped:
                accelerator.print(f"skipped {dropped} {name} pair(s) whose chosen and rejected are identical")
            if len(kept) == 0:
                raise ConfigError(f"the {name} split has no usable preference pairs (all chosen == rejected, or empty)")
            splits[name] = tokenize_preferences(
                kept, tokenizer, d.max_duration_seconds, d.preprocessing_num_workers, split=name
            )
            splits[name], dropped_codes = drop_identical_pairs(splits[name])
            if dropped_codes:
                accelerator.print(f"skipped {dropped_codes} {name} pair(s) whose chosen and rejected codes match")
    return splits["train"], splits["validation"]


def _align(cfg: AlignConfig, accelerator: Accelerator) -> RunResult:
    t, dpo = cfg.training, cfg.dpo
    resume = prepare_output_dir(cfg, accelerator)
    pusher = start_pusher(cfg, accelerator)
    policy_tokenizer = cfg.data.tokenizer or model_tokenizer(cfg.model.model_name_or_path)
    ref_source = dpo.ref_model_name_or_path or cfg.model.model_name_or_path
    if dpo.ref_model_name_or_path is not None:
        ref_tokenizer = model_tokenizer(ref_source)
        if folder_fingerprint(ref_tokenizer) != folder_fingerprint(policy_tokenizer):
            raise ConfigError(
                f"the reference model's tokenizer ({ref_tokenizer}) differs from the policy's ({policy_tokenizer}): "
                "DPO compares log-probabilities of the same codes, so both must use one tokenizer"
            )
    tokenizer = load_audio_tokenizer(policy_tokenizer)
    train_set, val_set = prepare_preferences(cfg, accelerator, tokenizer)
    lengths = [len(p[0]) + max(len(c[0]), len(r[0])) for s in (train_set, val_set) for p, c, r in zip(
        s["prompt_codes"], s["chosen_codes"], s["rejected_codes"], strict=True
    )]  # fmt: skip
    k = tokenizer.num_codebooks
    build = functools.partial(
        build_model, size=cfg.model.model_size, num_codebooks=k, codebook_size=tokenizer.codebook_size,
        max_positions=max(lengths) + k + 1, dropout=cfg.model.dropout,
    )  # fmt: skip
    model = build(cfg.model.model_name_or_path)
    reference = prepare_frozen(cfg, accelerator, build(ref_source))
    collate = PreferenceCollator(
        CodesCollator(k, model.config.pad_token_id, model.config.bos_token_id, tokenizer.frame_rate)
    )
    if dpo.precompute_ref_log_probs:  # one pass now; then only the policy stays in memory
        with accelerator.autocast():
            train_set = precompute_reference_logps(reference, train_set, collate, accelerator.device)
            val_set = precompute_reference_logps(reference, val_set, collate, accelerator.device)
        reference = None
    global_batch, sampler, max_steps = shuffled_sampler(cfg, accelerator, len(train_set))
    optimizer, scheduler = build_optimization(cfg, accelerator, model, global_batch, max_steps)
    model, optimizer, scheduler = prepare(cfg, accelerator, model, optimizer, scheduler)
    ema = build_ema(cfg, accelerator.unwrap_model(model))

    def export(folder: Path, use_ema: bool) -> None:
        swap = ema.average_parameters(accelerator.unwrap_model(model)) if use_ema else contextlib.nullcontext()
        with swap:
            ckpt.save_final_model(accelerator, model, folder, lambda f: tokenizer.save_pretrained(f / TOKENIZER_DIR))

    checkpointer = Checkpointer(
        cfg, accelerator, global_batch, max_steps,
        save_extras=lambda folder: tokenizer.save_pretrained(folder / TOKENIZER_DIR),
        extra_state=lambda step: {"sampler": sampler.state_at_step(step)},
        ema=ema, pusher=pusher, export=export,
        card=model_card_writer(cfg, "align", cfg.model.model_name_or_path, [cfg.data.dataset_name or "synthetic"]),
    )  # fmt: skip
    start_step = checkpointer.resume(resume) if resume is not None else 0
    accelerator.init_trackers("align", config=cfg.to_flat_dict())
    accelerator.print(
        f"{len(train_set)} train / {len(val_set)} validation pairs; {dpo.loss_type} loss, beta {dpo.beta}; "
        f"reference {'precomputed' if reference is None else ref_source}; global batch {global_batch}; "
        f"{max_steps} steps"
    )
    columns = ["prompt_codes", "chosen_codes", "rejected_codes"]
    columns += ["ref_chosen_logps", "ref_rejected_logps"] if reference is None else []
    batches = batch_stream(train_set, sampler, t.per_device_train_batch_size, collate, start_step, columns)
    objective = DPOObjective(dpo.beta, dpo.loss_type, dpo.label_smoothing, reference)

    def loss_fn(m: torch.nn.Module, batch: dict):
        with accelerator.autocast():  # the reference is not prepared, so autocast it here like the policy
            return objective(m, batch)

    def evaluate(step: int) -> dict[str, float]:
        stream = lambda: eval_batches(  # noqa: E731
            val_set, t.per_device_eval_batch_size, collate, accelerator.process_index, accelerator.num_processes,
            columns,
        )  # fmt: skip
        results = {f"eval/{k}": v for k, v in evaluate_metrics(accelerator, model, stream, loss_fn).items()}
        if ema is not None:
            with ema.average_parameters(accelerator.unwrap_model(model)):
                ema_metrics = evaluate_metrics(accelerator, model, stream, loss_fn)
            results.update({f"eval/{k}_ema": v for k, v in ema_metrics.items()})
        checkpointer.record(step, results)
        return results

    settings = loop_settings(cfg, accelerator, max_steps)
    return train_and_finish(
        cfg, accelerator, checkpointer, settings, model, optimizer, scheduler, batches, loss_fn, start_step,
        evaluate, ema,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The codec stage: an EnCodec model trained against discriminators; its output folder is a pretrain tokenizer
# --------------------------------------------------------------------------------------------------------------------

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
