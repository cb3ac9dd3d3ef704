"""Flow: text-to-audio latent flow matching, Stable Audio style, on diffusers.

A diffusers `StableAudioDiTModel` models the continuous latents of a VAE (`codecs/latents.py`: any
`AutoencoderOobleck`, or the weight-free block DCT), conditioned on text (cross-attention on a frozen T5's states,
projected by diffusers' `StableAudioProjectionModel`) and on duration (seconds start / total: cross-attention tokens
and the global token, as Stable Audio does). The objective is rectified flow: x_t = (1 - s) x_0 + s e, the model
predicts the velocity e - x_0 at timestep 1000 s, with s drawn from SD3's densities (`--weighting_scheme`, diffusers'
`compute_density_for_timestep_sampling`); padded latent frames are masked out of the loss, which sums over latent
frames so accumulation and DDP stay exact. Noise and timesteps are a pure function of (seed, epoch, row), and the
validation set's of (seed, row): the validation loss is measured at the same noisy points at every evaluation.

The null condition of classifier-free guidance is what `StableAudioPipeline` uses for its unconditional branch:
every cross-attention token zero, the global (duration) token kept. The export is a `StableAudioPipeline` folder
(with a flow scheduler), which diffusers loads and runs without this package. Runs pretrain, finetune (from such a
folder) and align (Diffusion-DPO, Wallace et al. 2023).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.codecs.latents import LatentSpace, latent_statistics, load_latent_space
from hf_audio_trainer.data.codes import batch_stream, eval_batches
from hf_audio_trainer.data.preferences import preference_pairs, prompt_texts, usable_pairs
from hf_audio_trainer.data.preprocess import encode_dataset, encode_text_states, encode_waves
from hf_audio_trainer.data.segments import middle_windows
from hf_audio_trainer.data.text import IDS, STATES, TextConfig, dropped, encode_texts, text_of
from hf_audio_trainer.distributed import whole_weights
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families.base import Checkpoints, Family, class_of
from hf_audio_trainer.hub import ModelCardText
from hf_audio_trainer.loop import evaluate_conditioned
from hf_audio_trainer.models import load_pretrained, num_parameters
from hf_audio_trainer.objectives import NUM_TRAIN_TIMESTEPS, Objective, TimeDensity, rectified_flow, sd3_times

STATS_ROWS = 256  # training clips the latent statistics are estimated from
NOISE_SALT, EVAL_SALT = 0xF10, 0xE7A1  # keep the noise streams apart from the other (seed, epoch, row) draws
PIPELINE_PARTS = ("transformer", "projection_model", "text_encoder", "tokenizer", "vae", "scheduler")

# Sizes of a new DiT (and its new T5 text encoder: musicgen_hub.TEXT_ENCODER_SIZES). "small" is ~100M parameters.
DIT_SIZES = {
    "micro": dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
                  cross_attention_dim=16, time_proj_dim=16, conditioning_dim=16),
    "tiny": dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, num_key_value_attention_heads=2,
                 cross_attention_dim=128, time_proj_dim=64, conditioning_dim=128),
    "small": dict(num_layers=12, attention_head_dim=64, num_attention_heads=12, num_key_value_attention_heads=6,
                  cross_attention_dim=768, time_proj_dim=256, conditioning_dim=768),
    "medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, num_key_value_attention_heads=12,
                   cross_attention_dim=768, time_proj_dim=256, conditioning_dim=768),  # Stable Audio Open's DiT
}  # fmt: skip


WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")  # diffusers' training_utils names


@dataclass
class FlowConfig:
    """The flow family: its latent space (a VAE) and the rectified-flow objective and sampler (diffusers' names)."""

    shapes_model: ClassVar[bool] = True  # the latent space sets the DiT's channels: a resume must match

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
        check(
            self.weighting_scheme in WEIGHTING_SCHEMES,
            f"weighting_scheme={self.weighting_scheme!r}: choose one of {list(WEIGHTING_SCHEMES)}",
        )
        check(self.logit_std > 0, f"logit_std={self.logit_std}: must be > 0")
        check(self.num_inference_steps >= 1, f"num_inference_steps={self.num_inference_steps}: must be >= 1")
        check(
            self.latent_hop_length >= 2 and self.latent_hop_length % 2 == 0,
            f"latent_hop_length={self.latent_hop_length}: must be an even number of samples >= 2",
        )


def check_config(cfg) -> None:
    """What the flow family cannot do yet with the stage's settings, refused before any work."""
    curriculum = getattr(cfg, "curriculum", None)
    check(
        cfg.training.max_tokens_per_batch is None and not (curriculum and curriculum.curriculum_segments),
        "--max_tokens_per_batch / --curriculum_segments: the flow family batches a fixed number of windows (not yet "
        "by duration); use --per_device_train_batch_size",
    )


# --------------------------------------------------------------------------------------------------------------------
# The model: the DiT and the conditioners, trained together
# --------------------------------------------------------------------------------------------------------------------


class FlowModel(torch.nn.Module):
    """`StableAudioDiTModel` + `StableAudioProjectionModel` as one network: velocity of latents x_t [B, C, T] at
    timesteps [B], given text states [B, L, d] (mask [B, L]), duration (seconds start / total [B]) and `keep` [B] (0:
    the null condition). It builds the DiT's inputs exactly as `StableAudioPipeline` does."""

    def __init__(self, transformer, projection):
        super().__init__()
        self.transformer, self.projection = transformer, projection

    @property
    def config(self):  # what trackers and the model card read
        return self.transformer.config

    def forward(self, x_t, timesteps, text_states, text_mask, keep, seconds_start, seconds_total):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        projection = self.projection
        text = projection(text_hidden_states=text_states).text_hidden_states * text_mask.unsqueeze(-1).to(x_t.dtype)
        seconds = projection(start_seconds=seconds_start, end_seconds=seconds_total)
        start, end = seconds.seconds_start_hidden_states, seconds.seconds_end_hidden_states
        cross = torch.cat([text, start, end], dim=1) * keep.to(x_t.dtype)[:, None, None]
        rotary = get_1d_rotary_pos_embed(
            self.transformer.config.attention_head_dim // 2, x_t.shape[2] + 1, use_real=True,
            repeat_interleave_real=False,
        )  # fmt: skip
        return self.transformer(
            x_t, timesteps, encoder_hidden_states=cross, global_hidden_states=torch.cat([start, end], dim=2),
            rotary_embedding=tuple(r.to(x_t.device) for r in rotary), return_dict=False,
        )[0]  # fmt: skip

    def new_like(self) -> FlowModel:
        """An untrained FlowModel of this one's configuration, on the CPU (the twin a merged LoRA export loads),
        drawing nothing from training's random stream."""
        with torch.random.fork_rng(devices=[]):
            transformer = type(self.transformer).from_config(self.transformer.config)
            projection = type(self.projection).from_config(self.projection.config)
        return FlowModel(transformer, projection)

    def save_pretrained(self, folder, state_dict=None, safe_serialization=True, **kwargs) -> None:
        """The pipeline's `transformer/` and `projection_model/` folders, from a gathered `state_dict` if given
        (diffusers' own save_pretrained takes none: under FSDP / ZeRO-3 it would write this rank's shards)."""
        save_model_parts(self, folder, PART_DIRS, state_dict)


PART_DIRS = {"transformer": "transformer", "projection": "projection_model"}


def save_model_parts(model: torch.nn.Module, folder, part_dirs: dict[str, str], state_dict=None) -> None:
    """Each diffusers submodule of `model` (by attribute name) in its pipeline folder (`part_dirs`): its config and
    its entries of `state_dict` (the model's own when None) as diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    state_dict = model.state_dict() if state_dict is None else state_dict
    for name, folder_name in part_dirs.items():
        part = {k.split(".", 1)[1]: v.detach().cpu().contiguous() for k, v in state_dict.items()
                if k.startswith(name + ".")}  # fmt: skip
        target = Path(folder) / folder_name
        getattr(model, name).save_config(target)
        save_file(part, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def new_flow_model(size: str, channels: int, frames: int, text_dim: int, max_seconds: float) -> FlowModel:
    from diffusers import StableAudioDiTModel
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel

    if size not in DIT_SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(DIT_SIZES)}")
    s = dict(DIT_SIZES[size])
    cond = s.pop("conditioning_dim")
    transformer = StableAudioDiTModel(
        sample_size=frames, in_channels=channels, out_channels=channels, cross_attention_input_dim=cond,
        global_states_input_dim=2 * cond, **s,
    )  # fmt: skip
    # Stable Audio feeds timesteps in [0, 1] to its random Fourier features; diffusers' flow schedulers give 1000 s,
    # so the (frozen) frequencies are scaled to match: the same features over the same range of noise levels
    with torch.no_grad():
        transformer.time_proj.weight.div_(NUM_TRAIN_TIMESTEPS)
    projection = StableAudioProjectionModel(text_dim, cond, 0, max(1, int(np.ceil(max_seconds))))
    return FlowModel(transformer, projection)


def load_flow_model(source: str) -> FlowModel:
    """The DiT and the conditioners of a flow pipeline folder or Hub id, every weight fitting (never re-initialised)."""
    check_flow_pipeline(source)
    return load_pipeline_model(source)


def load_pipeline_model(source: str) -> FlowModel:
    """The DiT and the conditioners of any StableAudioPipeline folder or Hub id, every weight fitting."""
    from diffusers import StableAudioDiTModel
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel

    transformer = load_pretrained(StableAudioDiTModel, source, "a StableAudioDiTModel", subfolder="transformer")
    projection = load_pretrained(
        StableAudioProjectionModel, source, "a StableAudioProjectionModel", subfolder="projection_model"
    )
    return FlowModel(transformer, projection)


def check_flow_pipeline(source: str) -> None:
    """Refuse what this family cannot continue: no pipeline folder, or one trained with another objective."""
    from huggingface_hub import hf_hub_download

    try:
        index = Path(source) / "model_index.json"
        index = index if index.is_file() else Path(hf_hub_download(source, "model_index.json"))
        parts = json.loads(index.read_text())
    except Exception:
        raise ConfigError(
            f"--model_name_or_path {source}: not a StableAudioPipeline folder or Hub id (no model_index.json); pass "
            "the output folder of a flow run"
        ) from None
    missing = [p for p in PIPELINE_PARTS if p not in parts]
    scheduler = parts.get("scheduler", [None, None])[1]
    if missing:
        raise ConfigError(f"--model_name_or_path {source}: its pipeline has no {', '.join(missing)}")
    if scheduler not in FLOW_SCHEDULERS:
        raise ConfigError(
            f"--model_name_or_path {source} samples with {scheduler}: it was not trained with rectified flow, so the "
            "flow objective would start it from a mismatch; fine-tune a flow run's export (Stable Audio Open, a "
            "v-objective model: the stable_audio family)"
        )


FLOW_SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler")


def export_scheduler():
    """The exported pipeline's sampler. `StableAudioPipeline` calls `scheduler.scale_model_input`, which diffusers'
    FlowMatchEulerDiscreteScheduler lacks, so the export carries UniPC on flow sigmas (prediction: velocity); in-loop
    samples use FlowMatchEulerDiscreteScheduler."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=1.0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Data: audio -> latents through the VAE, text -> the frozen T5's states; both computed once and cached
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LatentData:
    """Latent splits with their text states, and what made them (the latent space, the text encoder)."""

    latents: LatentSpace
    text_encoder: torch.nn.Module
    text_tokenizer: object
    train: Dataset
    validation: Dataset
    segment_frames: int | None
    max_seconds: float  # the longest duration the conditioner encodes
    prompts: list[str]  # validation descriptions, which in-loop samples are generated from
    prompt_states: list[np.ndarray]
    statistics: dict  # the latent statistics folded into the VAE
    pairs: bool = False


def text_parts(run, source: str | None):
    """The frozen text encoder and its tokenizer: a checkpoint's or pipeline's, or a new T5 over ByT5's bytes."""
    from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

    from hf_audio_trainer.families.musicgen_hub import BYT5_VOCAB, TEXT_ENCODER_SIZES

    if source is not None:
        # whole, not partitioned under ZeRO-3: it runs before `prepare` (transformers' ZeRO-3 switch stays on there)
        with whole_weights(run.accelerator) if run is not None else contextlib.nullcontext():
            encoder = load_pretrained(T5EncoderModel, source, "a T5EncoderModel", subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    else:
        cfg = run.cfg
        size = cfg.model.model_size
        encoder = T5EncoderModel(T5Config(vocab_size=BYT5_VOCAB, dropout_rate=0.0, **TEXT_ENCODER_SIZES[size]))
        tokenizer = ByT5Tokenizer(model_max_length=cfg.text.max_text_tokens)
    return encoder.eval().requires_grad_(False), tokenizer


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The pipeline's tokenization (its model_max_length); an empty description is the null condition (no ids)."""
    return [
        tokenizer(x, truncation=True, max_length=tokenizer.model_max_length)["input_ids"] if x else [] for x in texts
    ]


def latent_space_for(run, clips: Dataset, source: str | None) -> tuple[LatentSpace, dict]:
    """A checkpoint's or pipeline's (normalised) VAE as it is; else --vae or the block DCT, with the statistics of
    the first training clips folded in."""
    cfg, f = run.cfg, run.cfg.flow
    if source is not None:
        stats_file = Path(source) / "latents.json"
        if not stats_file.is_file() and not Path(source).is_dir():  # a Hub id
            from huggingface_hub import hf_hub_download

            try:
                stats_file = Path(hf_hub_download(str(source), "latents.json"))
            except Exception:  # a pipeline of another trainer: its VAE as it is
                pass
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        return load_latent_space(str(source), 0, 0, stats), stats
    from hf_audio_trainer.data.audio import decode_audio

    raw = load_latent_space(f.vae, f.sample_rate, f.latent_hop_length)
    if raw.audio_channels != 1:  # its data, samples and FAD are mono
        raise ConfigError(
            f"--vae {f.vae} has {raw.audio_channels} audio channels; the flow family trains over a mono VAE (Stable "
            "Audio Open's stereo one is fine-tuned with its own pipeline: --model_name_or_path "
            "stabilityai/stable-audio-open-1.0, the stable_audio family)"
        )
    rows = list(range(min(STATS_ROWS, len(clips))))
    audio = clips.select(rows)[cfg.data.audio_column]
    fit = 30 * raw.sample_rate  # the start of a long track is enough
    waves = [decode_audio(a, raw.sample_rate, where=f"train row {r}")[:fit] for a, r in zip(audio, rows, strict=True)]
    with torch.no_grad():
        latents = encode_waves(raw.encoder_on(run.accelerator.device), waves, np.float32)
    mean, std = latent_statistics(latents)
    return raw.normalized(mean, std), {"mean": mean.tolist(), "std": std.tolist(), "vae": raw.name, "rows": len(rows)}


LATENT_SETTINGS = ("vae", "latent_hop_length", "sample_rate")  # the flags that make a new latent space


def check_resumed_latents(run) -> None:
    """A resumed run reads its checkpoint's latent space; a latent setting given now that differs is refused by
    name (it would otherwise be ignored)."""
    saved = ckpt.verify_checkpoint(run.resume).get("config", {})
    now = run.cfg.to_flat_dict()
    given = [name for name in LATENT_SETTINGS if name in run.cfg.user_set and saved.get(name, now[name]) != now[name]]
    if given:
        raise ConfigError(
            f"{run.resume} was trained in another latent space: {ckpt.settings_that_differ(given, now, saved)}; "
            "resume with the checkpoint's settings, or start a new run in another --output_dir"
        )


def preprocess(run, clips: dict[str, Dataset]) -> LatentData:
    """Latents of both splits (through the normalised VAE) and the frozen text encoder's states of their
    descriptions, computed once on the accelerator across ranks and cached."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    # a resumed run reads its frozen parts where its checkpoint's are (the run's frozen/, or an older checkpoint)
    source = run.frozen if run.resume is not None else cfg.model.model_name_or_path
    if source is not None and run.resume is None:
        check_flow_pipeline(str(source))
    if run.resume is not None:
        check_resumed_latents(run)
    text_encoder, tokenizer = text_parts(run, str(source) if source is not None else None)
    latents, stats = latent_space_for(run, clips["train"], source)
    splits, prompts = {}, []
    for name in ("train", "validation"):
        texts = text_of(cfg.text, clips[name], name)
        prompts = texts
        with acc.main_process_first():
            split = clips[name].remove_columns([c for c in (IDS, STATES) if c in clips[name].column_names])
            split = split.add_column(IDS, token_ids(tokenizer, texts))
        split = encode_dataset(
            split, latents, acc, d.audio_column, d.max_duration_seconds, d.preprocessing_num_workers, split=name,
            keep=(IDS,), cache_dir=d.preprocessing_cache_dir, values="latents",
        )  # fmt: skip
        splits[name] = encode_text_states(
            split, text_encoder, acc, IDS, STATES, split=name, cache_dir=d.preprocessing_cache_dir
        )
    segment_frames = max(1, int(d.window_seconds * latents.frame_rate))
    with acc.main_process_first():
        validation = middle_windows(splits["validation"], segment_frames, column="latents")
        splits["validation"] = validation.add_column("row_id", list(range(len(validation))))
    longest = max(max(splits["train"]["num_frames"]), max(splits["validation"]["num_frames"]))
    max_seconds = max(longest, segment_frames) / latents.frame_rate
    states = [np.asarray(s, dtype=np.float32) for s in splits["validation"][STATES]]
    return LatentData(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], segment_frames,
        max_seconds, prompts, states, stats,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Batches: windows of latents, their noise and timestep, the text and duration conditions
# --------------------------------------------------------------------------------------------------------------------


def row_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def exact_seconds(frame_rate: float) -> Callable[[dict, int], tuple[float, float]]:
    """(seconds start, seconds total) of an example: its window's offset and its track's length, as they are."""

    def seconds(example: dict, frames: int) -> tuple[float, float]:
        return example.get("window_start", 0) / frame_rate, example.get("num_frames", frames) / frame_rate

    return seconds


class FlowCollator:
    """Rows (`latents` [C][T], `text_states`, `num_frames`, and `row` / `epoch` / `window_start` when training) ->
    a batch: latents zero-padded to the longest, `frame_mask`, one noise draw and timestep per row, the text states
    padded to the tokenizer's length (as the pipeline pads), duration, and `keep` (0: the null condition).

    Noise and timestep are a pure function of (seed, epoch, row) in training, so resume, accumulation and DDP see
    the same draws; with `fixed=True` (validation) of (seed, row) only, identical at every evaluation. `null=True`
    gives every row the null condition (`eval/loss_uncond`). The timestep comes from `times` (default: the flow
    section's SD3 density) and the duration condition from `seconds(example, frames)` (default: `exact_seconds`).
    `width`: latents are padded to at least that many frames (a fixed window, so the noise drawn for a row does not
    depend on the rows beside it); `text_side` "left": states are padded before the text, as a left-padding
    tokenizer pads (Gemma's)."""

    def __init__(self, frame_rate: float, text_length: int, flow_cfg=None, seed: int = 0, dropout: float = 0.0,
                 fixed: bool = False, null: bool = False, times: TimeDensity | None = None,
                 seconds: Callable[[dict, int], tuple[float, float]] | None = None, width: int = 0,
                 text_side: str = "right"):  # fmt: skip
        self.frame_rate, self.text_length = frame_rate, text_length
        self.seed, self.dropout, self.fixed, self.null = seed, dropout, fixed, null
        self.width, self.text_side = width, text_side
        if times is None:
            f = flow_cfg
            times = sd3_times(f.weighting_scheme, f.logit_mean, f.logit_std, f.mode_scale)
        self.times, self.seconds = times, seconds or exact_seconds(frame_rate)

    def draw(self, example: dict, row: int, channels: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        training = "epoch" in example and not self.fixed
        key = (self.seed, example["epoch"], row, NOISE_SALT) if training else (self.seed, row, EVAL_SALT)
        g = row_generator(*key)
        sigma = self.times(g)  # first: the noise below is drawn after it, as it always was
        return torch.randn(channels, frames, generator=g), sigma[0]

    def __call__(self, examples: list[dict]) -> dict:
        latents = [torch.as_tensor(np.asarray(ex["latents"], dtype=np.float32)) for ex in examples]
        channels, width = latents[0].shape[0], max(self.width, *(x.shape[1] for x in latents))
        b = len(examples)
        x0, noise = torch.zeros(b, channels, width), torch.zeros(b, channels, width)
        mask, sigmas = torch.zeros(b, width), torch.zeros(b)
        dim = max((np.asarray(ex[STATES]).shape[-1] for ex in examples if len(ex[STATES])), default=1)
        states = torch.zeros(b, self.text_length, dim)
        text_mask, keep = torch.zeros(b, self.text_length, dtype=torch.long), torch.zeros(b)
        start, total = torch.zeros(b), torch.zeros(b)
        for i, (ex, x) in enumerate(zip(examples, latents, strict=True)):
            row = ex.get("row", ex.get("row_id", i))  # training: the dataset row; validation: its row_id
            x0[i, :, : x.shape[1]], mask[i, : x.shape[1]] = x, 1.0
            noise[i], sigmas[i] = self.draw(ex, row, channels, width)
            s = np.asarray(ex[STATES], dtype=np.float32)[: self.text_length]
            if len(s):
                at = slice(self.text_length - len(s), None) if self.text_side == "left" else slice(0, len(s))
                states[i, at], text_mask[i, at] = torch.from_numpy(s), 1
            drop = self.null or not len(s) or ("epoch" in ex and dropped(self.seed, ex["epoch"], row, self.dropout))
            keep[i] = 0.0 if drop else 1.0
            start[i], total[i] = self.seconds(ex, x.shape[1])
        return {
            "latents": x0, "noise": noise, "sigmas": sigmas, "frame_mask": mask, "text_states": states,
            "text_mask": text_mask, "keep": keep, "seconds_start": start, "seconds_total": total,
            "num_items": int(mask.sum().item()), "num_samples": b, "audio_seconds": float(mask.sum()) / self.frame_rate,
            "sample_stats": {"null_condition": float(b - keep.sum())},
        }  # fmt: skip


def velocity_errors(model, batch: dict, objective: Objective = rectified_flow) -> torch.Tensor:
    """Squared error of the model's prediction of the `objective`'s target (rectified flow: the velocity), averaged
    over channels: [B, T] (float32). `sigmas` holds each example's time in [0, 1]."""
    x_t, time, target = objective(batch["latents"], batch["noise"], batch["sigmas"])
    pred = model(
        x_t, time, batch["text_states"], batch["text_mask"], batch["keep"], batch["seconds_start"],
        batch["seconds_total"],
    )  # fmt: skip
    return (pred.float() - target.float()).pow(2).mean(1)


def flow_loss(
    model, batch: dict, weighting_scheme: str = "none", objective: Objective = rectified_flow
) -> tuple[torch.Tensor, dict]:
    """Sum over unpadded latent frames of the (SD3-weighted) error; the loop divides by the frame count."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme, batch["sigmas"].float())
    return (velocity_errors(model, batch, objective) * batch["frame_mask"] * weights[:, None]).sum(), {}


def flow_sequence_logps(model, batch: dict, objective: Objective = rectified_flow) -> torch.Tensor:
    """Diffusion-DPO's stand-in for a log-probability: -1/2 the mean error of each sequence at its pair's shared
    noise and timestep (so DPO's logits are diffusers' train_diffusion_dpo `-(model_diff - ref_diff) / 2`)."""
    errors, mask = velocity_errors(model, batch, objective), batch["frame_mask"]
    return -0.5 * (errors * mask).sum(1) / mask.sum(1)


# --------------------------------------------------------------------------------------------------------------------
# Sampling: FlowMatchEulerDiscreteScheduler with classifier-free guidance
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latents(model: FlowModel, states, text_mask, seconds: float, frames: int, channels: int, guidance: float,
                   steps: int, generator=None, scheduler=None, noise=None) -> torch.Tensor:  # fmt: skip
    """Latents [B, C, frames] sampled from noise; guidance > 1 mixes in the null condition as the pipeline does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = next(model.parameters()).device
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    scheduler.set_timesteps(steps, device=device)
    b = states.shape[0]
    x = noise if noise is not None else torch.randn(b, channels, frames, generator=generator)
    x = x.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    states, text_mask = states.to(device), text_mask.to(device)
    guided = guidance > 1.0
    # a stochastic scheduler (CosineDPMSolverMultistepScheduler's SDE) seeds its noise from the generator, as the
    # pipeline passes it
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    cond = dict(
        text_states=torch.cat([states, states]) if guided else states,
        text_mask=torch.cat([text_mask, text_mask]) if guided else text_mask,
        keep=torch.cat([torch.zeros(b), torch.ones(b)]).to(device) if guided else torch.ones(b, device=device),
        seconds_start=torch.zeros(2 * b if guided else b, device=device),
        seconds_total=torch.full((2 * b if guided else b,), float(seconds), device=device),
    )
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            inp = scheduler.scale_model_input(inp, t)
        v = model(inp, t.expand(inp.shape[0]).to(inp.dtype), **cond)
        if guided:
            uncond, text = v.chunk(2)
            v = uncond + guidance * (text - uncond)
        x = scheduler.step(v, t, x, **step_kwargs).prev_sample
    return x.float()


def padded_states(states: list[np.ndarray], length: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Text states [B, length, d] and their mask, padded after the text (`side` "left": before it)."""
    dim = next((s.shape[-1] for s in states if s.ndim == 2 and len(s)), 1)
    out, mask = torch.zeros(len(states), length, dim), torch.zeros(len(states), length, dtype=torch.long)
    for i, s in enumerate(states):
        s = s[:length]
        if len(s):
            at = slice(length - len(s), None) if side == "left" else slice(0, len(s))
            out[i, at], mask[i, at] = torch.from_numpy(s), 1
    return out, mask


# --------------------------------------------------------------------------------------------------------------------
# What a stage asks of the family
# --------------------------------------------------------------------------------------------------------------------


def build_model(run, data: LatentData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    cfg = run.cfg
    if model_name_or_path is None:
        frames = data.segment_frames or max(data.train["num_frames"])
        text_dim = data.text_encoder.config.d_model
        model = new_flow_model(cfg.model.model_size, data.latents.channels, frames, text_dim, data.max_seconds)
    else:
        model = load_flow_model(model_name_or_path)
        if model.transformer.config.in_channels != data.latents.channels:
            raise ConfigError(
                f"{model_name_or_path}'s DiT reads {model.transformer.config.in_channels} latent channels but the "
                f"VAE makes {data.latents.channels}: use the VAE the model was trained with (drop --vae)"
            )
    if data.max_seconds > model.projection.config.max_value:
        raise ConfigError(
            f"clips last up to {data.max_seconds:.1f} s but {model_name_or_path}'s duration conditioner encodes at "
            f"most {model.projection.config.max_value} s: lower --max_duration_seconds"
        )
    return {"model": model}


def collator(run, data: LatentData, **kwargs) -> FlowCollator:
    return FlowCollator(
        data.latents.frame_rate, data.text_tokenizer.model_max_length, run.cfg.flow, run.cfg.training.seed, **kwargs
    )


def columns(data: LatentData, split: str = "train") -> list[str]:
    """What a batch reads: training rows get their row and epoch from the sampler, validation rows their row_id."""
    ids = ["row_id"] if split == "validation" or data.pairs else []
    if data.pairs:
        refs = [c for c in data.train.column_names if c.startswith("ref_")]
        return ["chosen_latents", "rejected_latents", STATES, *ids, *refs]
    return ["latents", STATES, "num_frames", *ids]


def batches(run, data: LatentData, models, sampler, start_step: int):
    t = run.cfg
    if data.pairs:  # DPO conditions every pair on its prompt: no condition dropout
        collate = PairCollator(collator(run, data))
    else:
        collate = collator(run, data, dropout=t.text.condition_dropout)
    return batch_stream(
        data.train, sampler, t.training.per_device_train_batch_size, collate, start_step, columns(data),
        positions=True, segment_frames=None if data.pairs else data.segment_frames, seed=t.training.seed,
    )  # fmt: skip


def loss(run, data: LatentData, models):
    return functools.partial(flow_loss, weighting_scheme=run.cfg.flow.weighting_scheme)


def generate_waves(run, data: LatentData, model, texts_states: list[np.ndarray], seconds: float) -> list[np.ndarray]:
    """Waveforms of `seconds` from each text state, through FlowMatchEulerDiscreteScheduler and the VAE."""
    length = data.text_tokenizer.model_max_length
    states, mask = padded_states(texts_states, length)
    window = data.segment_frames or int(round(seconds * data.latents.frame_rate))
    with run.accelerator.autocast():
        x = sample_latents(
            model, states, mask, seconds, window, data.latents.channels, run.cfg.text.guidance_scale,
            run.cfg.flow.num_inference_steps,
        )  # fmt: skip
    samples = int(seconds * data.latents.sample_rate)
    return [w[:samples].numpy() for w in data.latents.decode(x.cpu())]


def evaluate(run, data: LatentData, models, loss_fn=None):
    """evaluate(step, suffix, sample): `eval/loss` (the plain velocity error at each validation window's fixed noise
    and timestep) given the descriptions, and `eval/loss_uncond` given the null condition; on the `sample` pass,
    clips generated from validation descriptions (--guidance_scale, --num_inference_steps), scored by FAD
    (--fad_embedder) and CLAP (--clap_model)."""
    return evaluate_latents(
        run, data, models, loss_fn, functools.partial(collator, run, data), functools.partial(generate_waves, run),
        flow_loss, data.latents, columns(data, "validation"),
    )  # fmt: skip


def evaluate_latents(run, data: LatentData, models, loss_fn, collate_with, generate_with, objective_loss, audio,
                     eval_columns: list[str], pair_collator: type | None = None):  # fmt: skip
    """`evaluate` for a latent family: `collate_with(**kwargs)` its collator, `generate_with(data, model,
    text_states, seconds)` its sampler's waveforms, `objective_loss` its plain loss, `audio` what decodes the
    validation latents for FAD, `pair_collator` what batches its preference pairs (default `PairCollator`)."""
    from hf_audio_trainer.samples import prompted_sample_metrics

    cfg, acc, model = run.cfg, run.accelerator, models["model"]
    t = cfg.training
    with_text, null = collate_with(fixed=True), collate_with(fixed=True, null=True)
    if data.pairs:
        with_text = (pair_collator or PairCollator)(with_text)
    seconds = cfg.samples.eval_sample_seconds

    def generate(m, num_frames: int, rows: list[int]) -> list[np.ndarray]:
        return generate_with(data, m, [data.prompt_states[r] for r in rows], seconds)

    sample_metrics = prompted_sample_metrics(
        acc, cfg.samples, cfg.text.clap_model, data.prompts, generate, audio, data.validation, run.out, t.seed,
        column="latents",
    )  # fmt: skip

    def stream(collate):
        return lambda: eval_batches(
            data.validation, t.per_device_eval_batch_size, collate, acc.process_index, acc.num_processes,
            eval_columns,
        )  # fmt: skip

    return evaluate_conditioned(acc, model, stream(with_text), stream(null), objective_loss, loss_fn, sample_metrics)


def flops_per_item(models, data: LatentData) -> float:
    """~6 N per latent frame (the DiT's tokens), attention's share left out."""
    return 6.0 * num_parameters(models["model"], trainable_only=False)


def save_parts(run, data: LatentData, folder: Path) -> None:
    """Everything of the pipeline beside the trained networks: text encoder, tokenizer, VAE, scheduler, the
    pipeline index, and the latent statistics."""
    folder = Path(folder)
    data.text_encoder.save_pretrained(folder / "text_encoder")
    data.text_tokenizer.save_pretrained(folder / "tokenizer")
    data.latents.vae.save_pretrained(folder / "vae")
    export_scheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableAudioPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "projection_model": ["diffusers", "StableAudioProjectionModel"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", type(data.text_tokenizer).__name__],
        "transformer": ["diffusers", "StableAudioDiTModel"],
        "vae": ["diffusers", "AutoencoderOobleck"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "latents.json").write_text(json.dumps(data.statistics) + "\n")


def export(run, data: LatentData, models, folder: Path) -> None:
    """A `StableAudioPipeline` folder: the DiT and conditioners (gathered under FSDP / ZeRO-3; LoRA adapters merged
    in), the frozen text encoder and tokenizer, the normalised VAE, a flow scheduler."""
    lora = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    ckpt.save_final_model(run.accelerator, models["model"], folder, lambda f: save_parts(run, data, f), merge_lora=lora)


def frozen_files(run, data: LatentData, models, folder: Path) -> None:
    """The frozen parts a run stores once (in its frozen/, never in a checkpoint): what resuming needs to read the
    same latents and text states."""
    save_parts(run, data, folder)


def load_export(folder):
    """The exported pipeline, through diffusers alone."""
    from diffusers import StableAudioPipeline

    return StableAudioPipeline.from_pretrained(folder)


def describe(data: LatentData, models) -> str:
    model = models["model"]
    return (
        f"{len(data.train)} train / {len(data.validation)} validation clips with descriptions; latents: "
        f"{data.latents.name}, {data.latents.channels} channels at {data.latents.frame_rate:g} frames/s; windows of "
        f"{data.segment_frames} frames; {num_parameters(model):,} parameters "
        f"({num_parameters(model, trainable_only=True):,} trained)"
    )


# --------------------------------------------------------------------------------------------------------------------
# Align: Diffusion-DPO on (prompt, chosen, rejected) audio
# --------------------------------------------------------------------------------------------------------------------


class PairCollator:
    """B pairs -> 2B sequences (chosen first) sharing each pair's noise and timestep (Diffusion-DPO compares the
    two members' errors at the same noisy point), both conditioned on the pair's prompt; `num_items` is the pairs."""

    def __init__(self, inner: FlowCollator):
        self.inner = inner

    def __call__(self, rows: list[dict]) -> dict:
        # both members of a pair draw with the pair's row, so they share noise and timestep; a precomputed reference
        # was scored at each pair's fixed draw, so the policy then uses that one too (no epoch)
        fixed = "ref_chosen_logps" in rows[0]
        batch = self.inner([self.sequence(r, side, fixed) for side in ("chosen", "rejected") for r in rows])
        b = len(rows)
        batch.pop("sample_stats")
        batch["num_items"] = batch["num_samples"] = b
        batch["response_tokens"] = batch["frame_mask"].sum(1)
        for side in ("chosen", "rejected"):
            if f"ref_{side}_logps" in rows[0]:
                batch[f"ref_{side}_logps"] = torch.tensor([r[f"ref_{side}_logps"] for r in rows], dtype=torch.float32)
        return batch

    def sequence(self, row: dict, side: str, fixed: bool) -> dict:
        """The `side` member of a pair as the inner collator's example: its latents, the pair's prompt states, the
        pair's row (and epoch, unless the draw is `fixed`)."""
        return {
            "latents": row[f"{side}_latents"], STATES: row[STATES], "row": row.get("row", row.get("row_id")),
            **({"epoch": row["epoch"]} if "epoch" in row and not fixed else {}),
        }  # fmt: skip


def preferences(run) -> LatentData:
    """The pairs for `align`: TRL's format (a text `prompt`, `chosen` and `rejected` audio), or the embedded
    synthetic pairs (each clean clip's description; the clean clip chosen over a degraded copy), their audio encoded
    by the policy's VAE and their prompts by its frozen text encoder."""
    source = run.frozen if run.resume is not None else run.cfg.model.model_name_or_path
    if run.resume is None:
        check_flow_pipeline(str(source))
    text_encoder, tokenizer = text_parts(run, str(source))
    latents, stats = latent_space_for(run, None, source)
    return preference_latents(run, text_encoder, tokenizer, latents, stats)


def preference_latents(run, text_encoder, tokenizer, latents: LatentSpace, stats: dict, channels: int | None = None,
                       data_class: type = LatentData, encode_prompts: Callable | None = None,
                       **extra) -> LatentData:  # fmt: skip
    """The align stage's pairs as latents (through `latents`, decoding `channels` as `data.audio.decode_audio`
    does) with their prompts' text states (`encode_prompts(texts)`, default the flow families' tokenization through
    `text_encoder`): a `data_class` with the `extra` fields."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    with acc.main_process_first():
        pairs = preference_pairs(d, cfg.training.seed, text_prompts=True)
    from hf_audio_trainer.data.audio import decode_audio

    max_samples = int(d.max_duration_seconds * latents.sample_rate)
    splits, prompts, prompt_states = {}, [], []
    for name in ("train", "validation"):
        kept = usable_pairs(pairs[name], name, acc.print)
        texts = prompt_texts(kept, name)
        columns_ = {}
        for side in ("chosen", "rejected"):
            waves = [
                decode_audio(a, latents.sample_rate, where=f"{name} pair {i} ({side})", channels=channels)[
                    ..., :max_samples
                ]
                for i, a in enumerate(kept[side])
            ]
            with torch.no_grad():
                columns_[f"{side}_latents"] = [x.tolist() for x in encode_waves(latents, waves, np.float32)]
        if encode_prompts is None:
            states = encode_texts(text_encoder, token_ids(tokenizer, texts), acc.device)
        else:
            states = encode_prompts(texts)
        columns_[STATES] = [s.tolist() for s in states]
        columns_["row_id"] = list(range(len(kept)))
        splits[name] = Dataset.from_dict(columns_)
        if name == "validation":
            prompts, prompt_states = texts, states
    frames = max(len(x[0]) for s in splits.values() for c in ("chosen_latents", "rejected_latents") for x in s[c])
    return data_class(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], None,
        frames / latents.frame_rate, prompts, prompt_states, stats, pairs=True, **extra,
    )  # fmt: skip


def make_flow_preference_pairs(
    folder: str, prompts: list[str], scorer=None, num_samples: int = 4, seconds: float | None = None,
    guidance_scale: float = 3.0, num_inference_steps: int = 10, seed: int = 0,
) -> Dataset:  # fmt: skip
    """On-policy pairs (TangoFlux's CRPO) for `align --model_family flow --dataset_name` (save with save_to_disk):
    `num_samples` generations per prompt from a flow export through `StableAudioPipeline`, scored by
    `scorer(waves, sample_rate, texts)` (a `ClapScorer` for text adherence; default `tonal_clarity`), best vs worst,
    as TRL's `prompt` / `chosen` / `rejected` audio columns."""
    from diffusers import StableAudioPipeline

    from hf_audio_trainer.alignment import rank_generations, tonal_clarity

    pipe = StableAudioPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rate = pipe.vae.config.sampling_rate
    generator = torch.Generator().manual_seed(seed)

    def generate(texts: list[str]) -> list[torch.Tensor]:
        audio = pipe(texts, audio_end_in_s=seconds, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, generator=generator).audios  # fmt: skip
        return [a[0].float() for a in audio]

    def score(waves: list[np.ndarray], texts: list[str]) -> np.ndarray:
        if scorer is None:
            return np.asarray([tonal_clarity(w, rate) for w in waves])
        return scorer(waves, rate, texts)

    ranked = rank_generations(prompts, generate, lambda w: w.numpy(), score, num_samples)

    def as_audio(row: dict) -> dict:
        return {side: {"array": row[f"{side}_codes"], "sampling_rate": rate} for side in ("chosen", "rejected")}

    return ranked.map(as_audio, remove_columns=["chosen_codes", "rejected_codes"])


def precompute_reference(run, data: LatentData, reference: torch.nn.Module) -> LatentData:
    """The reference's Diffusion-DPO terms as columns, computed once at each pair's fixed noise and timestep."""
    return reference_columns(run, data, reference, collator(run, data, fixed=True), flow_sequence_logps)


def reference_columns(run, data: LatentData, reference: torch.nn.Module, collate, sequence_logps) -> LatentData:
    """`precompute_reference` with a family's own (fixed-draw) collator and sequence log-probabilities."""
    from hf_audio_trainer.alignment import with_reference_logps

    return with_reference_logps(data, reference, PairCollator(collate), columns(data), run.accelerator, sequence_logps)


FLOW = Family(
    name="flow",
    stages=("pretrain", "finetune", "align"),
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
    sequence_logps=flow_sequence_logps,
    precompute_reference=precompute_reference,
    text_conditioned=True,
    model_card=ModelCardText(
        "A text-to-audio latent flow-matching model (Stable Audio style: T5 text encoder, DiT, VAE)",
        "from diffusers import StableAudioPipeline\n\n"
        'pipe = StableAudioPipeline.from_pretrained("{repo_id}")\n'
        'audio = pipe("a warm pad with slow chords", audio_end_in_s=4.0, num_inference_steps=25).audios[0]',
        pipeline_tag="text-to-audio",
    ),
    lora_target_modules="to_q,to_k,to_v,to_out.0",
    sections={"text": TextConfig, "flow": FlowConfig},
    check_config=check_config,
    model_sizes=tuple(DIT_SIZES),
    checkpoints=Checkpoints(
        f"StableAudioPipeline sampling with {' or '.join(FLOW_SCHEDULERS)} (rectified flow)",
        lambda index: (
            class_of(index) == "StableAudioPipeline" and (index.get("scheduler") or ["", ""])[1] in FLOW_SCHEDULERS
        ),
    ),
)
