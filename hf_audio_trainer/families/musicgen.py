"""MusicGen: a multi-codebook decoder (transformers `MusicgenForCausalLM`, delay pattern) over discrete audio codes.

Audio becomes codes through an audio tokenizer (`codecs/`: the weight-free mel k-means, fitted on the training audio
when none is given, or EnCodec); the model predicts the next code of every codebook. Runs pretrain, finetune and
align (DPO over the decoder's sequence log-probabilities).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.alignment import (
    PreferenceCollator,
    generate_continuations,
    precompute_reference_logps,
    sequence_logps,
    tokenize_preferences,
)
from hf_audio_trainer.codecs import AudioTokenizer, MelKMeansTokenizer, TokenizerConfig, load_audio_tokenizer
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches
from hf_audio_trainer.data.preferences import drop_identical_pairs, preference_pairs, usable_pairs
from hf_audio_trainer.data.preprocess import encode_dataset
from hf_audio_trainer.data.segments import middle_windows
from hf_audio_trainer.data.streamed import first_rows, streamed_batches
from hf_audio_trainer.data.streaming import ShardStream
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families.base import Checkpoints, Family
from hf_audio_trainer.loop import evaluate_loss, evaluate_metrics
from hf_audio_trainer.models import load_pretrained, num_parameters

TOKENIZER_DIR = "tokenizer"  # a model folder keeps its tokenizer here
FIT_CLIPS = 500  # clips a new mel k-means tokenizer is fitted on
FIT_SECONDS = 30.0  # of each
SAMPLE_RATE = 16000  # of a new mel k-means tokenizer

# Sizes of a new model. "tiny" trains in a few minutes on two CPU cores.
MODEL_SIZES = {
    "micro": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64),  # tests, benchmarks
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, ffn_dim=2048),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
}


@dataclass
class LossConfig:
    """The language-model loss (align has its own objective, with TRL's `label_smoothing` for noisy preferences)."""

    stages: ClassVar[tuple[str, ...]] = ("pretrain", "finetune")

    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the training cross-entropy."})

    def __post_init__(self) -> None:
        check(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing}: must be in [0, 1)")


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


def new_model_config(
    size: str, num_codebooks: int, codebook_size: int, max_positions: int, dropout: float | None = None
) -> MusicgenDecoderConfig:
    """A decoder config for a tokenizer's codebooks; the pad/BOS id is one past the last code."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    config = MusicgenDecoderConfig(
        vocab_size=codebook_size,
        num_codebooks=num_codebooks,
        max_position_embeddings=max_positions,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        audio_channels=1,
        **MODEL_SIZES[size],
    )
    set_dropout(config, dropout)
    return config


def set_dropout(config: MusicgenDecoderConfig, dropout: float | None) -> None:
    """Override every dropout probability of the config (None keeps the model's own)."""
    if dropout is not None:
        config.dropout = config.attention_dropout = config.activation_dropout = dropout


def build_decoder(
    model_name_or_path: str | None,
    size: str,
    num_codebooks: int,
    codebook_size: int,
    max_positions: int,
    dropout: float | None = None,
) -> MusicgenForCausalLM:
    """Load a MusicgenForCausalLM from a folder or Hub id, or make a new one sized for the tokenizer."""
    if model_name_or_path is None:
        model = MusicgenForCausalLM(new_model_config(size, num_codebooks, codebook_size, max_positions, dropout))
        # transformers initialises the code embeddings with std 0.02, which the unit-scale sinusoidal positions
        # drown out: a small model then needs hundreds of steps to grow them (measured on the default run: val loss
        # 5.29 vs 3.53 after 150 steps). N(0, 1) is torch's and audiocraft's own init for these embeddings.
        for embedding in model.get_input_embeddings():
            torch.nn.init.normal_(embedding.weight, std=1.0)
        return freeze_cross_attention(model)
    overrides = {}
    if dropout is not None:
        overrides = dict(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    refuse_composite(model_name_or_path)
    model = load_pretrained(MusicgenForCausalLM, model_name_or_path, "a MusicgenForCausalLM", **overrides)
    check_model_fits_tokenizer(model.config, num_codebooks, codebook_size, max_positions)
    return freeze_cross_attention(model)


def refuse_composite(model_name_or_path: str) -> None:
    """A text-conditioned MusicGen (text encoder + codec + decoder) is the musicgen_text family's, not this one's."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    except (OSError, ValueError):
        return  # load_pretrained reports what is wrong with the folder
    if model_type in ("musicgen", "musicgen_melody"):
        raise ConfigError(
            f"{model_name_or_path} is a text-conditioned MusicGen ({model_type}: text encoder, codec and decoder); "
            "train it with --model_family musicgen_text"
        )


def freeze_cross_attention(model: MusicgenForCausalLM) -> MusicgenForCausalLM:
    """Unconditional training passes no encoder states, so cross-attention gets no gradient: freeze it.

    Otherwise DDP waits for gradients that never come (it needs every trainable parameter to get one), and the
    optimizer would keep states for weights it never updates. The weights stay in the model and its checkpoints.
    """
    for name, param in model.named_parameters():
        if ".encoder_attn" in name:
            param.requires_grad_(False)
    return model


def check_model_fits_tokenizer(
    config: MusicgenDecoderConfig, num_codebooks: int, codebook_size: int, max_positions: int
) -> None:
    """Fail early when a loaded model cannot read the tokenizer's codes."""
    if config.num_codebooks != num_codebooks:
        raise ConfigError(
            f"the model predicts {config.num_codebooks} codebooks but the tokenizer makes {num_codebooks}; "
            "use the tokenizer the model was trained with (--tokenizer)"
        )
    if config.vocab_size < codebook_size:
        raise ConfigError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's codebook_size "
            f"{codebook_size}; use the tokenizer the model was trained with (--tokenizer)"
        )
    if config.max_position_embeddings < max_positions:
        raise ConfigError(
            f"the model handles {config.max_position_embeddings} positions but clips need {max_positions}; "
            "lower --segment_seconds"
        )


def lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum (not mean) of the per-token cross-entropies over all codebooks; the loop divides by the token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # float32 for the softmax even under autocast, so bf16/fp16 runs report comparable losses
    loss = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss, {}


def training_flops_per_token(num_params: int, tokens_per_position: int = 1) -> float:
    """~6 N FLOPs per position for a forward and backward pass (Kaplan et al. 2020), attention's share left out.

    A MusicGen-style decoder reads all its codebooks at one position, so a code costs 6 N / num_codebooks.
    """
    return 6.0 * num_params / tokens_per_position


@torch.no_grad()
def clip_losses(model: MusicgenForCausalLM, tokenizer: AudioTokenizer, waves: list[np.ndarray]) -> np.ndarray:
    """Each clip's mean per-token loss under `model` (NaN for a clip too short to predict): a difficulty score."""
    k = tokenizer.num_codebooks
    config = model.config
    max_frames = config.max_position_embeddings - k + 1  # the delay pattern adds k - 1 positions
    codes = [c[:, :max_frames].numpy() for c in tokenizer.encode_batch(waves)]
    if not any(c.shape[1] for c in codes):  # nothing to predict (and nothing the collator could pad)
        return np.full(len(waves), np.nan)
    batch = CodesCollator(k, config.pad_token_id, config.bos_token_id, tokenizer.frame_rate)(
        [{"codes": c} for c in codes]
    )
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    # The collator folds codebooks into the batch (row b * k + j is codebook j of clip b), so k rows make a clip.
    total = token_loss.view(len(waves), -1).sum(1)
    targets = (labels != -100).view(len(waves), -1).sum(1)
    return (total.double() / targets).cpu().numpy()


def load_clip_scorer(model_name_or_path: str):
    """(score(waves) -> per-clip losses, what identifies the model) of a run's output folder (model + tokenizer/)."""
    folder = Path(model_name_or_path)
    if not (folder / TOKENIZER_DIR).is_dir():
        raise ConfigError(
            f"{model_name_or_path} has no {TOKENIZER_DIR}/ folder; pass the output folder of a run, "
            "which holds the model and the tokenizer it was trained with"
        )
    model = load_pretrained(MusicgenForCausalLM, str(folder), "a MusicgenForCausalLM").eval()
    tokenizer = load_audio_tokenizer(folder / TOKENIZER_DIR)
    check_model_fits_tokenizer(model.config, tokenizer.num_codebooks, tokenizer.codebook_size, 0)
    return functools.partial(clip_losses, model, tokenizer), tokenizer.sample_rate


# --------------------------------------------------------------------------------------------------------------------
# Data: audio -> codes, through the tokenizer
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CodesData:
    """Tokenized splits and the tokenizer that made them; `max_positions` is what the model must hold."""

    tokenizer: AudioTokenizer
    train: Dataset
    validation: Dataset
    max_positions: int
    columns: list[str] | None = None  # the columns a training batch reads (None: codes, and difficulty if any)
    collate_rows: type | None = None  # wraps the codes collator for rows that are not plain clips (preference pairs)
    segment_frames: int | None = None  # the training window (None: whole sequences, as preference pairs are)


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


def prepare_tokenizer(run, train_set: Dataset) -> AudioTokenizer:
    """The checkpoint's tokenizer when resuming, a given one, or a mel k-means fitted on training clips."""
    cfg, accelerator = run.cfg, run.accelerator
    source = run.frozen / TOKENIZER_DIR if run.resume is not None else cfg.tokenizer.tokenizer
    if source is None and cfg.model.model_name_or_path is not None:  # a model keeps its tokenizer beside it
        source = model_tokenizer(cfg.model.model_name_or_path)
    if source is not None:
        if (Path(source) / TOKENIZER_DIR).is_dir():  # a run's output folder or checkpoint: its tokenizer inside
            source = Path(source) / TOKENIZER_DIR
        return load_audio_tokenizer(str(source))
    fitted = run.out / TOKENIZER_DIR
    if accelerator.is_main_process:  # fit once, the other ranks load the result
        rng = np.random.default_rng(cfg.training.seed)
        rows = rng.permutation(len(train_set))[:FIT_CLIPS].tolist()
        audio = train_set.select(rows)[cfg.data.audio_column]
        fit_samples = int(FIT_SECONDS * SAMPLE_RATE)  # the start of a long track is enough to fit on
        waves = [
            decode_audio(a, SAMPLE_RATE, where=f"train row {r}")[:fit_samples] for a, r in zip(audio, rows, strict=True)
        ]
        tokenizer = MelKMeansTokenizer.fit(
            waves,
            sample_rate=SAMPLE_RATE,
            num_codebooks=cfg.tokenizer.num_codebooks,
            codebook_size=cfg.tokenizer.codebook_size,
            seed=cfg.training.seed,
        )
        tokenizer.save_pretrained(fitted)
    accelerator.wait_for_everyone()
    return load_audio_tokenizer(str(fitted))


def preprocess(run, clips: dict[str, Dataset]) -> CodesData:
    """Get a tokenizer and tokenize both splits of the audio clips once (cached by datasets where it can)."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.model.model_name_or_path is not None:
        refuse_composite(cfg.model.model_name_or_path)
    d = cfg.data
    stream = clips["train"] if isinstance(clips["train"], ShardStream) else None
    if stream is not None:  # tokenized a micro-batch at a time; a new tokenizer is fitted on its first clips
        fitting = run.resume is None and cfg.tokenizer.tokenizer is None and cfg.model.model_name_or_path is None
        clips = {**clips, "train": first_rows(stream, FIT_CLIPS, d.audio_column) if fitting else None}
    tokenizer = prepare_tokenizer(run, clips["train"])
    if stream is not None:
        segment_frames = max(1, int(d.window_seconds * tokenizer.frame_rate))
        validation = encode_dataset(
            clips["validation"], tokenizer, accelerator, d.audio_column, d.max_duration_seconds,
            d.preprocessing_num_workers, split="validation", cache_dir=d.preprocessing_cache_dir,
        )  # fmt: skip
        with accelerator.main_process_first():
            validation = middle_windows(validation, segment_frames)
        max_positions = segment_frames + tokenizer.num_codebooks + 1
        return CodesData(tokenizer, stream, validation, max_positions, segment_frames=segment_frames)
    splits = {
        name: encode_dataset(
            clips[name],
            tokenizer,
            accelerator,
            d.audio_column,
            d.max_duration_seconds,
            d.preprocessing_num_workers,
            split=name,
            cache_dir=d.preprocessing_cache_dir,
        )  # fmt: skip
        for name in ("train", "validation")
    }
    segment_frames = max(1, int(d.window_seconds * tokenizer.frame_rate))
    with accelerator.main_process_first():
        splits["validation"] = middle_windows(splits["validation"], segment_frames)
    # positions: BOS + frames + the delay of the last codebook
    max_positions = segment_frames + tokenizer.num_codebooks + 1
    return CodesData(tokenizer, splits["train"], splits["validation"], max_positions, segment_frames=segment_frames)


def folder_fingerprint(folder: str) -> str:
    """A hash of every file in a folder (two tokenizers are the same when their saved files are)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def preferences(run) -> CodesData:
    """The pairs for `align` (embedded synthetic ones by default), checked, without identical pairs, tokenized with
    the policy's tokenizer (which the reference's must equal)."""
    cfg, accelerator, d, dpo = run.cfg, run.accelerator, run.cfg.data, run.cfg.dpo
    policy_tokenizer = d.tokenizer or model_tokenizer(cfg.model.model_name_or_path)
    if dpo.ref_model_name_or_path is not None:
        ref_tokenizer = model_tokenizer(dpo.ref_model_name_or_path)
        if folder_fingerprint(ref_tokenizer) != folder_fingerprint(policy_tokenizer):
            raise ConfigError(
                f"the reference model's tokenizer ({ref_tokenizer}) differs from the policy's ({policy_tokenizer}): "
                "DPO compares log-probabilities of the same codes, so both must use one tokenizer"
            )
    tokenizer = load_audio_tokenizer(policy_tokenizer)
    with accelerator.main_process_first():
        pairs = preference_pairs(d, cfg.training.seed)
        splits = {}
        for name in ("train", "validation"):
            kept = usable_pairs(pairs[name], name, accelerator.print)
            splits[name] = tokenize_preferences(
                kept, tokenizer, d.max_duration_seconds, d.preprocessing_num_workers, split=name
            )
            splits[name], dropped_codes = drop_identical_pairs(splits[name])
            if dropped_codes:
                accelerator.print(f"skipped {dropped_codes} {name} pair(s) whose chosen and rejected codes match")
    lengths = [len(p[0]) + max(len(c[0]), len(r[0])) for s in splits.values() for p, c, r in zip(
        s["prompt_codes"], s["chosen_codes"], s["rejected_codes"], strict=True
    )]  # fmt: skip
    columns = ["prompt_codes", "chosen_codes", "rejected_codes"]
    max_positions = max(lengths) + tokenizer.num_codebooks + 1
    return CodesData(tokenizer, splits["train"], splits["validation"], max_positions, columns, PreferenceCollator)


def precompute_reference(run, data: CodesData, reference: torch.nn.Module) -> CodesData:
    """The reference's log-probabilities as columns, computed once (then only the policy stays in memory)."""
    collate = collator(data, reference)
    with run.accelerator.autocast():
        train = precompute_reference_logps(reference, data.train, collate, run.accelerator.device)
        validation = precompute_reference_logps(reference, data.validation, collate, run.accelerator.device)
    columns = [*data.columns, "ref_chosen_logps", "ref_rejected_logps"]
    return CodesData(data.tokenizer, train, validation, data.max_positions, columns, data.collate_rows)


# --------------------------------------------------------------------------------------------------------------------
# What a stage asks of the family
# --------------------------------------------------------------------------------------------------------------------


def build_model(run, data: CodesData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    m, tokenizer = run.cfg.model, data.tokenizer
    model = build_decoder(
        model_name_or_path, m.model_size, tokenizer.num_codebooks, tokenizer.codebook_size, data.max_positions,
        dropout=m.dropout,
    )  # fmt: skip
    return {"model": model}


def collator(data: CodesData, model: torch.nn.Module):
    """Delay-pattern batches with `model`'s pad and BOS ids (a reference under ZeRO-3 is an engine: its .module)."""
    config, tokenizer = getattr(model, "module", model).config, data.tokenizer
    k = tokenizer.num_codebooks
    collate = CodesCollator(k, config.pad_token_id, config.bos_token_id, tokenizer.frame_rate)
    return data.collate_rows(collate) if data.collate_rows is not None else collate


def batches(run, data: CodesData, models, sampler, start_step: int):
    collate = collator(data, run.accelerator.unwrap_model(models["model"]))
    micro_batch = run.cfg.training.per_device_train_batch_size
    if isinstance(data.train, ShardStream):
        d = run.cfg.data
        encoder = data.tokenizer.encoder_on(run.accelerator.device)
        return streamed_batches(
            sampler, encoder, collate, micro_batch, start_step, d.audio_column, data.segment_frames,
            d.max_duration_seconds,
        )  # fmt: skip
    return batch_stream(
        data.train, sampler, micro_batch, collate, start_step, data.columns, segment_frames=data.segment_frames,
        seed=run.cfg.training.seed,
    )  # fmt: skip


def loss(run, data: CodesData, models):
    # smoothing shapes the training targets only; validation reports the plain cross-entropy
    return functools.partial(lm_loss, label_smoothing=run.cfg.loss.label_smoothing)


def evaluate(run, data: CodesData, models, loss_fn=None):
    """evaluate(step, suffix, sample): validation loss of the current weights (`eval/loss` + suffix), with the
    item-weighted sums `loss_fn` adds (DPO's rewards) when given; FAD of sampled clips on the `sample` pass."""
    from hf_audio_trainer.samples import SampleEvaluator

    cfg, accelerator, model = run.cfg, run.accelerator, models["model"]
    collate = collator(data, accelerator.unwrap_model(model))
    lg, t = cfg.samples, cfg.training
    sampler = None
    if lg.fad_embedder is not None:
        generate = functools.partial(sample_waves, data=data)
        sampler = SampleEvaluator(
            accelerator, data.tokenizer, generate, data.validation, lg.fad_embedder, lg.fad_embedder_model,
            lg.num_eval_samples, lg.eval_sample_seconds, run.out, seed=t.seed,
        )  # fmt: skip

    def stream():
        return eval_batches(
            data.validation, t.per_device_eval_batch_size, collate, accelerator.process_index,
            accelerator.num_processes, data.columns,
        )  # fmt: skip

    def evaluate_weights(step: int, suffix: str, sample: bool) -> dict[str, float]:
        if loss_fn is None:
            results = {f"eval/loss{suffix}": evaluate_loss(accelerator, model, stream, lm_loss)}
        else:
            results = {f"eval/{k}{suffix}": v for k, v in evaluate_metrics(accelerator, model, stream, loss_fn).items()}
        if sample and sampler is not None:  # generation uses the EMA weights when there are some
            results.update(sampler(model, step))
        return results

    return evaluate_weights


def flops_per_item(models, data: CodesData) -> float:
    return training_flops_per_token(num_parameters(models["model"]), data.tokenizer.num_codebooks)


def save_tokenizer(data: CodesData, folder: Path) -> None:
    data.tokenizer.save_pretrained(folder / TOKENIZER_DIR)


def export(run, data: CodesData, models, folder: Path) -> None:
    """A `from_pretrained` MusicgenForCausalLM folder with its tokenizer/ (LoRA adapters merged into a copy)."""
    merge = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    ckpt.save_final_model(
        run.accelerator, models["model"], folder, functools.partial(save_tokenizer, data), merge_lora=merge
    )


def describe(data: CodesData, models) -> str:
    model = models["model"]
    if isinstance(data.train, ShardStream):
        clips = f"{data.train.rows_per_rank(0)} streamed train clips per process / {len(data.validation)} validation"
    else:
        frames = max(max(data.train["num_frames"]), max(data.validation["num_frames"]))
        clips = f"{len(data.train)} train / {len(data.validation)} validation clips, up to {frames} frames"
    return (
        f"{clips}; {f'windows of {data.segment_frames} frames; ' if data.segment_frames else ''}"
        f"{num_parameters(model):,} parameters ({num_parameters(model, trainable_only=True):,} trained)"
    )


def sample_waves(model, num_frames: int, num_samples: int, data: CodesData) -> list[np.ndarray]:
    """Unconditional samples of `num_frames` code frames (no prompt), clamped to the tokenizer's codes, decoded."""
    k, tokenizer = data.tokenizer.num_codebooks, data.tokenizer
    codes = generate_continuations(model, torch.zeros(k, 0, dtype=torch.long), num_frames, num_samples)
    return [tokenizer.decode(c.clamp(max=tokenizer.codebook_size - 1)).numpy() for c in codes]


MUSICGEN = Family(
    name="musicgen",
    stages=("pretrain", "finetune", "align"),
    preprocess=preprocess,
    build_model=build_model,
    batches=batches,
    loss=loss,
    evaluate=evaluate,
    flops_per_item=flops_per_item,
    export=export,
    load_export=MusicgenForCausalLM.from_pretrained,
    describe=describe,
    frozen_files=lambda run, data, models, folder: save_tokenizer(data, folder),
    preferences=preferences,
    sequence_logps=sequence_logps,
    precompute_reference=precompute_reference,
    load_clip_scorer=load_clip_scorer,
    streams=True,
    checkpoints=Checkpoints.of_class("MusicgenForCausalLM"),
    sections={"tokenizer": TokenizerConfig, "loss": LossConfig},
    model_sizes=tuple(MODEL_SIZES),
)
