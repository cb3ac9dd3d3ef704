"""Stable Audio 3: fine-tune a `StableAudio3Pipeline` from its diffusers folder, with the objective it was trained with.

The checkpoint is a `StableAudio3Pipeline` (stabilityai/stable-audio-3-*, or a folder this family exported): a
`StableAudio3DiTModel` over the latents of the `AutoencoderSAME` VAE, conditioned on a frozen T5Gemma's states and on
the duration (`StableAudio3DurationEmbedder`: the DiT's global AdaLN input, and one more cross-attention token after
the text), sampled by `FlowMatchEulerDiscreteScheduler` over the pipeline's log-SNR sigma schedule.

What the pipeline samples is what trains:

- objective: rectified flow, x_t = (1 - t) x0 + t e, target the velocity e - x0 (the scheduler's step takes
  x0 = x_t - sigma v), plain MSE; the DiT reads t times the scheduler's `num_train_timesteps` (1 in Stable Audio 3:
  t itself, what the scheduler's timesteps are). t is uniform, shifted towards noise by the window's length as the
  stable-audio-3 trainers do (their "full" distribution shift, `objectives.length_shift`; `--timestep_shift false`:
  plain uniform).
- text: the pipeline's tokenization (padded to min(model_max_length, 256) tokens on the tokenizer's own side, Gemma's
  left) through the T5Gemma encoder, states computed once and cached; padded positions become the DiT's learned
  padding embedding, as in the pipeline.
- duration: the clip's duration (its whole length, also for a window cut from it, as the reference trainers keep
  seconds_total), through the duration embedder to the global input and the extra cross-attention token.
- the null condition of classifier-free guidance is the pipeline's unconditional branch: the empty prompt's states,
  the duration kept (condition dropout draws it per example; `eval/loss_uncond` measures it).
- data: stereo at the VAE's rate (a mono clip on both channels), latents of the source's VAE as they are (SAME's
  soft-norm bottleneck already normalises them: no scale), fixed windows (the longest clip, or --segment_seconds),
  a shorter clip zero-padded and its padding out of the loss (the reference trainers' signal-only loss).

What trains: the DiT (all weights, or LoRA through peft on its attention and feed-forward projections). T5Gemma, the
tokenizer, the VAE and the scheduler are the source's, frozen and copied unchanged into the export. The duration
embedder stays frozen unless --train_duration_embedder (a full fine-tune; under LoRA add duration_embedder.linear to
--lora_target_modules): on a small dataset every clip has nearly one duration, and a trained embedder learns that
length rather than the music (the stable-audio-3 LoRA trainer excludes it by default for that reason). The DiT's
`to_local_embed` layers (the inpainting pipeline's input, which text-to-audio never feeds) stay frozen. A LoRA is
merged into the exported pipeline and saved beside it as a peft adapter for the DiT (`transformer_lora/`). Runs
finetune and align (Diffusion-DPO with the same rectified flow).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.codecs.latents import LatentSpace
from hf_audio_trainer.data.codes import batch_stream
from hf_audio_trainer.data.preprocess import encode_dataset, encode_text_states
from hf_audio_trainer.data.text import IDS, STATES, TextConfig, text_of
from hf_audio_trainer.distributed import whole_weights
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families import flow, stable_audio
from hf_audio_trainer.families.base import Checkpoints, Family, class_of
from hf_audio_trainer.families.flow import FlowCollator, LatentData, PairCollator, padded_states
from hf_audio_trainer.hub import ModelCardText
from hf_audio_trainer.models import load_pretrained, num_parameters
from hf_audio_trainer.objectives import length_shift, rectified_flow, shifted_times, uniform_times

PIPELINE = "StableAudio3Pipeline"
SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FROZEN_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # the source's, copied into the export unchanged
TRAINED_PARTS = ("transformer", "duration_embedder")
PART_DIRS = {"transformer": "transformer", "duration_embedder": "duration_embedder"}
ADAPTER_DIR = stable_audio.ADAPTER_DIR  # the DiT's LoRA adapter beside a merged export (peft's format)
SNAPSHOT_FILES = ["model_index.json", *(f"{part}/*" for part in (*FROZEN_PARTS, *TRAINED_PARTS))]
MAX_TEXT_TOKENS = 256  # the pipeline caps T5Gemma's input at 256 tokens, whatever the tokenizer allows
LOGSNR_MIN, LOGSNR_MAX = -6.2, 2.0  # the pipeline's default sigma schedule


@dataclass
class StableAudio3Config:
    """The stable_audio_3 family: what trains beside the DiT, the timestep density, and the sampler of in-loop
    samples (the pipeline's)."""

    train_duration_embedder: bool = field(
        default=False,
        metadata={
            "help": "Also train the duration embedder (a full fine-tune; under --use_peft add duration_embedder.linear "
            "to --lora_target_modules instead). Off: on a few clips it would learn their length, not their music."
        },
    )
    timestep_shift: bool = field(
        default=True,
        metadata={
            "help": "Shift the uniform training times towards noise by the window's length (the stable-audio-3 "
            "trainers' 'full' distribution shift: x1.65 up to 256 latent frames, x3.16 from 4096); false: uniform."
        },
    )
    num_inference_steps: int | None = field(
        default=None,
        metadata={
            "help": "Sampler steps of in-loop samples; unset: the pipeline's own choice (8 for a stochastic_sampling "
            "scheduler, the distilled model's; 100 otherwise)."
        },
    )
    logsnr_min: float = field(default=LOGSNR_MIN, metadata={"help": "The in-loop sampler's lowest log-SNR (start)."})
    logsnr_max: float = field(default=LOGSNR_MAX, metadata={"help": "The in-loop sampler's highest log-SNR (end)."})

    def __post_init__(self) -> None:
        check(
            self.num_inference_steps is None or self.num_inference_steps >= 1,
            f"num_inference_steps={self.num_inference_steps}: must be >= 1",
        )
        check(
            self.logsnr_min < self.logsnr_max,
            f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max}: the first must be below the second",
        )


def check_config(cfg) -> None:
    """What this family cannot do with the stage's settings, refused before any work."""
    flow.check_config(cfg)
    check(
        not cfg.text.train_text_encoder,
        "--train_text_encoder: Stable Audio 3's T5Gemma stays frozen (its states are computed once); drop the flag",
    )
    lora = getattr(cfg, "finetune", None) is not None and cfg.finetune.use_peft
    check(
        not (lora and cfg.stable_audio_3.train_duration_embedder),
        "--train_duration_embedder with --use_peft: LoRA trains the modules --lora_target_modules names; add "
        "duration_embedder.linear to them to adapt the duration embedder, and drop --train_duration_embedder",
    )


# --------------------------------------------------------------------------------------------------------------------
# The source: a StableAudio3Pipeline (rectified flow through FlowMatchEulerDiscreteScheduler)
# --------------------------------------------------------------------------------------------------------------------


def claims(index: dict) -> bool:
    """A StableAudio3Pipeline (what `Family.checkpoints` tests)."""
    return class_of(index) == PIPELINE


def check_pipeline(folder: Path, name: str) -> dict:
    """Refuse what this family cannot continue (before any work): not a StableAudio3Pipeline, a part missing, or a
    scheduler the pipeline does not sample rectified flow with. Returns the pipeline's model_index.json."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(
            f"--model_name_or_path {name}: not a {PIPELINE} folder (no model_index.json); pass a diffusers folder "
            "such as stabilityai/stable-audio-3-small-base"
        )
    index = json.loads(index_file.read_text())
    if class_of(index) != PIPELINE:
        raise ConfigError(
            f"--model_name_or_path {name} is a {class_of(index)}; the stable_audio_3 family fine-tunes a {PIPELINE} "
            "(stabilityai/stable-audio-3-*)"
        )
    missing = [p for p in (*TRAINED_PARTS, *FROZEN_PARTS) if p not in index or not (folder / p).is_dir()]
    if missing:
        raise ConfigError(f"--model_name_or_path {name}: its pipeline has no {', '.join(missing)}; pass a whole one")
    scheduler = (index.get("scheduler") or [None, None])[1]
    if scheduler != SCHEDULER:
        raise ConfigError(
            f"--model_name_or_path {name} samples with {scheduler}, not {SCHEDULER}: the stable_audio_3 family trains "
            f"the rectified flow that {PIPELINE} samples with {SCHEDULER}; restore its scheduler"
        )
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for key, why in (
        ("use_dynamic_shifting", f"{PIPELINE} passes no mu, so its set_timesteps would fail"),
        ("invert_sigmas", "the noise would run the other way"),
    ):
        if config.get(key):
            raise ConfigError(
                f"{name}'s scheduler sets {key}: {why}; the stable_audio_3 family trains the pipeline's own sampling "
                f"(fix scheduler/scheduler_config.json: {key} false)"
            )
    return index


def local_pipeline(source: str) -> Path:
    return stable_audio.local_pipeline(source, SNAPSHOT_FILES)


def sources(run) -> tuple[Path, Path]:
    """(the pipeline's folder, the folder its frozen parts are read from: on resume the run's own copy, `run.frozen`,
    so a resume reads the latents and text states it was trained on)."""
    folder = local_pipeline(str(run.cfg.model.model_name_or_path))
    if run.resume is None:
        check_pipeline(folder, str(run.cfg.model.model_name_or_path))
        if json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("stochastic_sampling"):
            run.accelerator.print(
                f"{run.cfg.model.model_name_or_path} samples with stochastic_sampling (a distilled Stable Audio 3): "
                "rectified-flow fine-tuning gradually undoes the distillation; the -base checkpoints are the ones to "
                "fine-tune"
            )
        return folder, folder
    frozen = Path(run.frozen)
    return folder, frozen if (frozen / "model_index.json").is_file() else folder


def frozen_parts(run, folder: Path):
    """The source's T5Gemma, its tokenizer (the class model_index.json names, as diffusers loads it) and its SAME VAE
    as a latent space, the frozen networks in the run's precision (T5Gemma stays float32 under fp16)."""
    import transformers
    from diffusers import AutoencoderSAME
    from transformers import T5GemmaEncoderModel

    acc = run.accelerator if run is not None else None
    index = json.loads((folder / "model_index.json").read_text())
    # whole, not partitioned under ZeRO-3: it runs before `prepare`
    with whole_weights(acc) if acc is not None else contextlib.nullcontext():
        text_encoder = load_pretrained(
            T5GemmaEncoderModel, str(folder), "a T5GemmaEncoderModel", subfolder="text_encoder"
        )
    tokenizer_class = getattr(transformers, index["tokenizer"][1], transformers.AutoTokenizer)
    tokenizer = tokenizer_class.from_pretrained(str(folder / "tokenizer"))
    vae = load_pretrained(AutoencoderSAME, str(folder), "an AutoencoderSAME", subfolder="vae")
    if acc is not None:
        text_encoder, vae = (
            module.to(dtype) if (dtype := stable_audio.frozen_dtype(acc, part)) != torch.float32 else module
            for module, part in ((text_encoder, "text_encoder"), (vae, "vae"))
        )  # fmt: skip
    latents = LatentSpace(vae, name=f"{folder.name}/vae", what=f"{folder}/vae")
    return text_encoder.eval().requires_grad_(False), tokenizer, latents


# --------------------------------------------------------------------------------------------------------------------
# Text: the pipeline's tokenization and padding
# --------------------------------------------------------------------------------------------------------------------


def text_length(tokenizer) -> int:
    """The pipeline's padded prompt length: the tokenizer's model_max_length, at most 256."""
    return min(getattr(tokenizer, "model_max_length", MAX_TEXT_TOKENS), MAX_TEXT_TOKENS)


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each description's token ids as the pipeline tokenizes it (truncated to its padded length, unpadded); an empty
    description is the null condition (no ids)."""
    length = text_length(tokenizer)
    return [tokenizer(x, truncation=True, max_length=length)["input_ids"] if x else [] for x in texts]


class PromptEncoder:
    """`encode(encoder, ids, device)` for `encode_text_states`: T5Gemma's states of each id sequence padded as the
    pipeline pads it (to `length`, with the pad token, on the tokenizer's side: T5Gemma's positions count the
    padding before a left-padded text), the states of the text's own tokens kept ([tokens, d], float32)."""

    def __init__(self, tokenizer):
        self.length, self.side = text_length(tokenizer), tokenizer.padding_side
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache_name = f"stable_audio_3-prompts-{self.length}-{self.side}-{self.pad}"

    @torch.no_grad()
    def __call__(self, encoder, ids: list[list[int]], device, batch_size: int = 64) -> list[np.ndarray]:
        encoder = encoder.to(device).eval()
        out: list[np.ndarray] = []
        for start in range(0, len(ids), batch_size):
            chunk = [list(x)[: self.length] for x in ids[start : start + batch_size]]
            tokens = torch.full((len(chunk), self.length), self.pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), self.length, dtype=torch.long)
            for i, x in enumerate(chunk):
                at = slice(self.length - len(x), None) if self.side == "left" else slice(0, len(x))
                if x:
                    tokens[i, at], mask[i, at] = torch.tensor(x, dtype=torch.long), 1
            states = encoder(tokens.to(device), attention_mask=mask.to(device))[0].float().cpu()
            out.extend(states[i][mask[i].bool()].numpy() for i in range(len(chunk)))
        return out


# --------------------------------------------------------------------------------------------------------------------
# The model: the DiT and the duration embedder, with the pipeline's conditioning
# --------------------------------------------------------------------------------------------------------------------


class StableAudio3Model(torch.nn.Module):
    """`StableAudio3DiTModel` + `StableAudio3DurationEmbedder` as one network: velocity of latents x_t [B, C, T] at
    timesteps [B], given text states [B, L, d] and their mask [B, L] (padded as the pipeline pads), `keep` [B] (0:
    the null condition, the empty prompt's states `null_states` / `null_mask`) and the duration (`seconds_total` [B];
    `seconds_start` is not an input of Stable Audio 3). It builds the DiT's inputs exactly as `StableAudio3Pipeline`
    does: the duration embedding is the global input and one more cross-attention token after the text."""

    def __init__(self, transformer, duration_embedder, null_states: torch.Tensor | None = None,
                 null_mask: torch.Tensor | None = None, num_train_timesteps: float = 1.0):  # fmt: skip
        super().__init__()
        self.transformer, self.duration_embedder = transformer, duration_embedder
        self.num_train_timesteps = num_train_timesteps  # the scheduler's: the DiT reads this times t
        width = transformer.config.cond_token_dim
        self.register_buffer("null_states", torch.zeros(1, width) if null_states is None else null_states, False)
        self.register_buffer(
            "null_mask", torch.zeros(1, dtype=torch.long) if null_mask is None else null_mask, persistent=False
        )

    @property
    def config(self):  # what trackers and the model card read
        return self.transformer.config

    def set_null(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """The null condition: the empty prompt's padded states [L, d] and mask [L]."""
        self.null_states, self.null_mask = states.float(), mask.long()

    def forward(self, x_t, timesteps, text_states, text_mask, keep, seconds_start, seconds_total):
        b, width = x_t.shape[0], self.null_states.shape[-1]
        if text_states.shape[-1] != width:  # every row of the batch is the null condition (no text states at all)
            text_states = text_states.new_zeros(b, *self.null_states.shape)
            text_mask = text_mask.new_zeros(b, self.null_mask.shape[0])
        kept = keep.bool()
        states = torch.where(kept[:, None, None], text_states, self.null_states.to(text_states.dtype))
        mask = torch.where(kept[:, None], text_mask, self.null_mask)
        duration = self.duration_embedder(seconds_total)  # [B, d]: the AdaLN input
        context = torch.cat([states, duration.unsqueeze(1).to(states.dtype)], dim=1)
        context_mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        return self.transformer(
            x_t, timesteps, encoder_hidden_states=context, global_hidden_states=duration,
            encoder_attention_mask=context_mask, return_dict=False,
        )[0]  # fmt: skip

    def new_like(self) -> StableAudio3Model:
        """An untrained twin of this configuration on the CPU (what a merged LoRA export loads into), drawing nothing
        from training's random stream."""
        with torch.random.fork_rng(devices=[]):
            transformer = type(self.transformer).from_config(self.transformer.config)
            embedder = type(self.duration_embedder).from_config(self.duration_embedder.config)
        return StableAudio3Model(
            transformer, embedder, self.null_states.cpu(), self.null_mask.cpu(), self.num_train_timesteps
        )

    def save_pretrained(self, folder, state_dict=None, safe_serialization=True, **kwargs) -> None:
        """The pipeline's `transformer/` and `duration_embedder/` folders, from a gathered `state_dict` if given."""
        flow.save_model_parts(self, folder, PART_DIRS, state_dict)


def load_pipeline_model(folder: str) -> StableAudio3Model:
    """The DiT and the duration embedder of a StableAudio3Pipeline folder, every weight fitting."""
    from diffusers import StableAudio3DiTModel
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder

    transformer = load_pretrained(StableAudio3DiTModel, folder, "a StableAudio3DiTModel", subfolder="transformer")
    embedder = load_pretrained(
        StableAudio3DurationEmbedder, folder, "a StableAudio3DurationEmbedder", subfolder="duration_embedder"
    )
    return StableAudio3Model(transformer, embedder)


# --------------------------------------------------------------------------------------------------------------------
# Data: stereo latents of the source's VAE, T5Gemma's states, fixed windows
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StableAudio3Data(LatentData):
    """flow's latent data, with the pipeline folder whose frozen parts the export keeps, the null condition (the
    empty prompt's states), how prompts are padded, and the scheduler's timestep scale."""

    source: str = ""
    null_states: np.ndarray | None = None  # the empty prompt's own token states [tokens, d]
    text_length: int = MAX_TEXT_TOKENS
    text_side: str = "right"
    num_train_timesteps: float = 1.0


def window_frames(run, longest: int, frame_rate: float) -> int:
    """The training window: the longest clip (every clip fits whole), or --segment_seconds when shorter."""
    seconds = run.cfg.data.segment_seconds
    if seconds is None:
        return longest
    return max(1, min(longest, int(seconds * frame_rate)))


def preprocess(run, clips: dict[str, Dataset]) -> StableAudio3Data:
    """Both splits' latents (the source's VAE, its channels) and their descriptions' T5Gemma states (padded as the
    pipeline pads), computed once on the accelerator across ranks and cached; the null condition's states."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    folder, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    encode = PromptEncoder(tokenizer)
    stable_audio.say_channels(run, clips["train"], latents)
    splits, prompts = {}, []
    for name in ("train", "validation"):
        texts = text_of(cfg.text, clips[name], name)
        prompts = texts
        with acc.main_process_first():
            split = clips[name].remove_columns([c for c in (IDS, STATES) if c in clips[name].column_names])
            split = split.add_column(IDS, prompt_ids(tokenizer, texts))
        split = encode_dataset(
            split, latents, acc, d.audio_column, d.max_duration_seconds, d.preprocessing_num_workers, split=name,
            keep=(IDS,), cache_dir=d.preprocessing_cache_dir, values="latents", channels=latents.audio_channels,
        )  # fmt: skip
        splits[name] = encode_text_states(
            split, text_encoder, acc, IDS, STATES, split=name, cache_dir=d.preprocessing_cache_dir, encode=encode
        )
    window = window_frames(run, max(splits["train"]["num_frames"]), latents.frame_rate)
    with acc.main_process_first():
        validation = stable_audio.middle_windows(splits["validation"], window)
        splits["validation"] = validation.add_column("row_id", list(range(len(validation))))
    longest = max(max(splits["train"]["num_frames"]), max(splits["validation"]["num_frames"]))
    null = encode(text_encoder, [tokenizer("", truncation=True, max_length=encode.length)["input_ids"]], acc.device)
    states = [np.asarray(s, dtype=np.float32) for s in splits["validation"][STATES]]
    scheduler = json.loads((frozen / "scheduler" / "scheduler_config.json").read_text())
    return StableAudio3Data(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], window,
        longest / latents.frame_rate, prompts, states, {}, source=str(frozen), null_states=null[0],
        text_length=encode.length, text_side=encode.side,
        num_train_timesteps=float(scheduler.get("num_train_timesteps", 1000)),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Batches and loss: flow's collator over fixed windows, shifted uniform times, rectified flow at the DiT's scale
# --------------------------------------------------------------------------------------------------------------------


def width(data: StableAudio3Data) -> int:
    """Every batch's latent width: the training window, or (pairs, whole) the longest member."""
    return data.segment_frames or max(1, round(data.max_seconds * data.latents.frame_rate))


def time_density(run, data: StableAudio3Data):
    """t uniform, shifted by the window's length unless --timestep_shift false."""
    if not run.cfg.stable_audio_3.timestep_shift:
        return uniform_times
    return shifted_times(uniform_times, length_shift(width(data)))


def collator(run, data: StableAudio3Data, **kwargs) -> FlowCollator:
    return FlowCollator(
        data.latents.frame_rate, data.text_length, seed=run.cfg.training.seed, times=time_density(run, data),
        width=width(data), text_side=data.text_side, **kwargs,
    )  # fmt: skip


def columns(data: StableAudio3Data, split: str = "train") -> list[str]:
    """What a batch reads: latents, text states, the clip's length; validation rows also their row and window."""
    if data.pairs:
        return flow.columns(data, split)
    where = ["row_id", "window_start"] if split == "validation" else []
    return ["latents", STATES, "num_frames", *where]


def batches(run, data: StableAudio3Data, models, sampler, start_step: int):
    t = run.cfg
    if data.pairs:  # DPO conditions every pair on its prompt: no condition dropout
        collate = PairCollator(collator(run, data))
    else:
        collate = collator(run, data, dropout=t.text.condition_dropout)
    return batch_stream(
        data.train, sampler, t.training.per_device_train_batch_size, collate, start_step, columns(data),
        positions=True, segment_frames=None if data.pairs else data.segment_frames, seed=t.training.seed,
    )  # fmt: skip


def objective(data: StableAudio3Data):
    """Rectified flow, read at t times the scheduler's num_train_timesteps (Stable Audio 3's: 1)."""
    return functools.partial(rectified_flow, num_train_timesteps=data.num_train_timesteps)


def plain_loss(data: StableAudio3Data):
    return functools.partial(flow.flow_loss, objective=objective(data))


def time_scale(model) -> float:
    """The num_train_timesteps a (wrapped: DDP, DeepSpeed, peft) StableAudio3Model reads t at."""
    while hasattr(model, "module"):
        model = model.module
    return model.num_train_timesteps  # peft forwards the attribute to its base model


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Diffusion-DPO's per-sequence terms (flow's) under this model's rectified flow."""
    scaled = functools.partial(rectified_flow, num_train_timesteps=time_scale(model))
    return flow.flow_sequence_logps(model, batch, objective=scaled)


def loss(run, data: StableAudio3Data, models):
    return plain_loss(data)


# --------------------------------------------------------------------------------------------------------------------
# The model, evaluation and in-loop samples
# --------------------------------------------------------------------------------------------------------------------


def build_model(run, data: StableAudio3Data, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    """The source's DiT and duration embedder, every weight fitting (a missing or mis-shaped one is refused), with
    the null condition; the duration embedder frozen unless --train_duration_embedder, the inpainting input always."""
    folder = local_pipeline(str(model_name_or_path or run.cfg.model.model_name_or_path))
    if run.resume is None and model_name_or_path is not None:
        check_pipeline(folder, str(model_name_or_path))
    model = load_pipeline_model(str(folder))
    dit, embedder = model.transformer.config, model.duration_embedder.config
    width = data.text_encoder.config.encoder.hidden_size
    if dit.io_channels != data.latents.channels or {dit.cond_token_dim, dit.global_cond_dim, embedder.output_dim} != {
        width
    }:
        raise ConfigError(
            f"{folder}: its DiT reads {dit.io_channels} latent channels, {dit.cond_token_dim}-wide text tokens and a "
            f"{dit.global_cond_dim}-wide duration, but its VAE makes {data.latents.channels} channels, its text "
            f"encoder {width}-wide states and its duration embedder {embedder.output_dim}: the pipeline's parts do not "
            "belong together"
        )
    if data.max_seconds > embedder.max_val:
        raise ConfigError(
            f"clips last up to {data.max_seconds:.1f} s but {folder}'s duration embedder encodes at most "
            f"{embedder.max_val:g} s: lower --max_duration_seconds"
        )
    null, mask = padded_states([data.null_states], data.text_length, data.text_side)
    model.set_null(null[0], mask[0])
    model.num_train_timesteps = data.num_train_timesteps
    for block in model.transformer.transformer_blocks:
        block.to_local_embed.requires_grad_(False)
    if not run.cfg.stable_audio_3.train_duration_embedder:
        model.duration_embedder.requires_grad_(False)
    return {"model": model}


def source_scheduler(data: StableAudio3Data):
    """The source's own scheduler (what the export samples with)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(data.source, subfolder="scheduler")


@torch.no_grad()
def sample_latents(model: StableAudio3Model, states, text_mask, seconds: float, channels: int, frame_rate: float,
                   guidance: float, steps: int, scheduler, logsnr_min: float = LOGSNR_MIN,
                   logsnr_max: float = LOGSNR_MAX, generator=None, noise=None) -> torch.Tensor:  # fmt: skip
    """Latents [B, C, frames] of `seconds` as `StableAudio3Pipeline` samples them: its latent length, its log-SNR
    sigma schedule through `scheduler` (whose stochastic steps draw from `generator`, as the pipeline passes it),
    guidance > 1 mixing in the null condition (the empty prompt, duration kept) as the pipeline does."""
    from diffusers.pipelines.stable_audio_3.pipeline_stable_audio_3 import logsnr_sigma_schedule, retrieve_timesteps
    from diffusers.utils.torch_utils import randn_tensor

    device = next(model.parameters()).device
    b = states.shape[0]
    frames = int(math.ceil(seconds * frame_rate))  # the pipeline's ceil(duration * rate / hop)
    x = noise if noise is not None else randn_tensor((b, channels, frames), generator=generator, device=device)
    x = x.to(device)
    timesteps, _ = retrieve_timesteps(scheduler, sigmas=logsnr_sigma_schedule(steps, logsnr_min, logsnr_max),
                                      device=device)  # fmt: skip
    guided = guidance > 1.0
    n = 2 * b if guided else b
    cond = dict(
        text_states=(torch.cat([states, states]) if guided else states).to(device),
        text_mask=(torch.cat([text_mask, text_mask]) if guided else text_mask).to(device),
        keep=(torch.cat([torch.zeros(b), torch.ones(b)]) if guided else torch.ones(b)).to(device),
        seconds_start=torch.zeros(n, device=device),
        seconds_total=torch.full((n,), float(seconds), device=device),
    )
    for t in timesteps:
        inp = torch.cat([x, x]) if guided else x
        v = model(inp, t.expand(n), **cond)
        if guided:
            uncond, text = v.chunk(2)
            v = uncond + guidance * (text - uncond)
        x = scheduler.step(v, t, x, generator=generator).prev_sample
    return x.float()


def generate_waves(run, data: StableAudio3Data, model, texts_states: list[np.ndarray], seconds: float):
    """Mono waveforms of `seconds` from each text state, as the exported pipeline makes them (its sampler, steps and
    schedule; an empty description is the empty prompt's states)."""
    s = run.cfg.stable_audio_3
    texts_states = [x if len(x) else data.null_states for x in texts_states]
    states, mask = padded_states(texts_states, data.text_length, data.text_side)
    scheduler = source_scheduler(data)
    steps = s.num_inference_steps or (8 if scheduler.config.stochastic_sampling else 100)
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    with run.accelerator.autocast():
        x = sample_latents(
            model, states, mask, seconds, data.latents.channels, data.latents.frame_rate, run.cfg.text.guidance_scale,
            steps, scheduler, s.logsnr_min, s.logsnr_max, generator=generator,
        )  # fmt: skip
    audio = stable_audio.MonoView(data.latents.encoder_on(run.accelerator.device)).decode(x)
    return [w[: int(seconds * data.latents.sample_rate)].numpy() for w in audio]


def evaluate(run, data: StableAudio3Data, models, loss_fn=None):
    """evaluate(step, suffix, sample): `eval/loss` (the velocity error at each validation window's fixed noise and
    time) given the descriptions, `eval/loss_uncond` given the null condition; on the `sample` pass, clips generated
    from validation descriptions through the pipeline's sampler, scored by FAD (--fad_embedder) and CLAP
    (--clap_model)."""
    return flow.evaluate_latents(
        run, data, models, loss_fn, functools.partial(collator, run, data), functools.partial(generate_waves, run),
        plain_loss(data), stable_audio.MonoView(data.latents), columns(data, "validation"),
    )  # fmt: skip


def flops_per_item(models, data: StableAudio3Data) -> float:
    """~6 N per latent frame (the DiT's tokens), attention's share left out."""
    return 6.0 * num_parameters(models["model"], trainable_only=False)


def describe(data: StableAudio3Data, models) -> str:
    model, latents = models["model"], data.latents
    dtypes = [str(next(m.parameters()).dtype).removeprefix("torch.") for m in (data.text_encoder, latents.vae)]
    trained = any(p.requires_grad for n, p in model.named_parameters() if "duration_embedder." in n)  # wrapped too
    embedder = "trained" if trained else "frozen"
    return (
        f"{len(data.train)} train / {len(data.validation)} validation clips with descriptions; latents: the source's "
        f"SAME VAE ({latents.audio_channels} audio channels at {latents.sample_rate} Hz), {latents.channels} channels "
        f"at {latents.frame_rate:g} frames/s; windows of {data.segment_frames} frames; rectified flow at timestep "
        f"{data.num_train_timesteps:g} t; {num_parameters(model):,} parameters "
        f"({num_parameters(model, trainable_only=True):,} trained, duration embedder {embedder}); frozen T5Gemma in "
        f"{dtypes[0]}, VAE in {dtypes[1]}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Export: the source's pipeline with the trained DiT (LoRA merged, the adapter beside it) and duration embedder
# --------------------------------------------------------------------------------------------------------------------


def save_parts(data: StableAudio3Data, folder: Path) -> None:
    """The source's model_index.json and frozen parts, copied byte for byte."""
    source, folder = Path(data.source), Path(folder)
    shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    for part in FROZEN_PARTS:
        shutil.copytree(source / part, folder / part, dirs_exist_ok=True)


def save_adapter(peft_model, state_dict: dict, folder: Path) -> None:
    """The DiT's LoRA adapter in peft's format (`stable_audio.save_dit_adapter`), when only the DiT is adapted; with
    the duration embedder adapted too, the merged pipeline alone holds the result."""
    if any(k.startswith("base_model.model.duration_embedder.") and "lora_" in k for k in state_dict):
        return
    stable_audio.save_dit_adapter(peft_model, state_dict, folder)


def export(run, data: StableAudio3Data, models, folder: Path) -> None:
    """A `StableAudio3Pipeline` folder: the trained DiT and duration embedder (gathered under FSDP / ZeRO-3; LoRA
    merged in, the DiT's adapter in transformer_lora/), the source's frozen parts and scheduler unchanged."""
    lora = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    ckpt.save_final_model(
        run.accelerator, models["model"], folder, lambda f: save_parts(data, f), merge_lora=lora,
        save_adapter=save_adapter,
    )  # fmt: skip


def frozen_files(run, data: StableAudio3Data, models, folder: Path) -> None:
    """The run's frozen parts, stored once (`frozen/`): a resume reads the same latents and text states."""
    save_parts(data, folder)


def load_export(folder):
    """The exported pipeline, through diffusers alone."""
    from diffusers import StableAudio3Pipeline

    return StableAudio3Pipeline.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# Align: Diffusion-DPO with the pipeline's rectified flow
# --------------------------------------------------------------------------------------------------------------------


def preferences(run) -> StableAudio3Data:
    """The pairs for `align` (TRL's format, or the embedded synthetic pairs) as the source's stereo latents, their
    prompts as T5Gemma's states padded as the pipeline pads them."""
    acc = run.accelerator
    folder, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    encode = PromptEncoder(tokenizer)
    null = encode(text_encoder, [tokenizer("", truncation=True, max_length=encode.length)["input_ids"]], acc.device)
    scheduler = json.loads((frozen / "scheduler" / "scheduler_config.json").read_text())
    return flow.preference_latents(
        run, text_encoder, tokenizer, latents, {}, channels=latents.audio_channels, data_class=StableAudio3Data,
        encode_prompts=lambda texts: encode(text_encoder, prompt_ids(tokenizer, texts), acc.device),
        source=str(frozen), null_states=null[0], text_length=encode.length, text_side=encode.side,
        num_train_timesteps=float(scheduler.get("num_train_timesteps", 1000)),
    )  # fmt: skip


def precompute_reference(run, data: StableAudio3Data, reference: torch.nn.Module) -> StableAudio3Data:
    """The reference's Diffusion-DPO terms as columns, computed once at each pair's fixed noise and time."""
    return flow.reference_columns(run, data, reference, collator(run, data, fixed=True), sequence_logps)


STABLE_AUDIO_3 = Family(
    name="stable_audio_3",
    stages=("finetune", "align"),
    preprocess=preprocess,
    build_model=build_model,
    batches=batches,
    loss=loss,
    evaluate=evaluate,
    flops_per_item=flops_per_item,
    export=export,
    load_export=load_export,
    describe=describe,
    frozen_files=frozen_files,
    preferences=preferences,
    sequence_logps=sequence_logps,
    precompute_reference=precompute_reference,
    text_conditioned=True,
    model_card=ModelCardText(
        "A text-to-audio rectified-flow model fine-tuned from Stable Audio 3 (T5Gemma text encoder, DiT, SAME VAE)",
        "import torch\nfrom diffusers import StableAudio3Pipeline\n\n"
        'pipe = StableAudio3Pipeline.from_pretrained("{repo_id}")\n'
        'audio = pipe("a warm pad with slow chords", duration=10.0, guidance_scale=7.0,\n'
        "             generator=torch.Generator().manual_seed(0)).audios[0]  # [2, samples] at 44.1 kHz",
        pipeline_tag="text-to-audio",
    ),
    lora_target_modules="to_qkv,to_q,to_kv,to_out,ff.proj_in,ff.proj_out",
    sections={"text": TextConfig, "stable_audio_3": StableAudio3Config},
    check_config=check_config,
    checkpoints=Checkpoints(f"{PIPELINE} (Stable Audio 3's rectified flow)", claims),
)
