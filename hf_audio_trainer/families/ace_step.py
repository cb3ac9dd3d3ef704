"""ACE-Step: fine-tune ACE-Step 1.5 from its diffusers folder (`AceStepPipeline`), with the objective it samples.

The checkpoint is an `AceStepPipeline` (a Qwen3 text encoder and its tokenizer, `AceStepConditionEncoder` for caption,
lyrics and timbre, the `AceStepTransformer1DModel` DiT, a stereo 48 kHz `AutoencoderOobleck`, and
`FlowMatchEulerDiscreteScheduler` with `num_train_timesteps=1`). What the pipeline samples, this family trains:

- Objective: flow matching as ACE-Step's own `forward` trains it: x_t = t e + (1 - t) x0, the DiT regresses the
  velocity e - x0 at timestep t itself in [0, 1] (its timestep embedding scales by 1000 inside; `timestep_r` = t),
  t = sigmoid(N(mu, sigma)) with mu -0.4, sigma 1 (the release config's `timestep_mu` / `timestep_sigma`), plain MSE
  (`objectives.rectified_flow_unit`). The sampler's `shift` only warps the inference schedule.
- Conditioning, built as `AceStepPipeline.__call__` builds it: the caption in the pipeline's SFT prompt template
  (instruction "text2music", metadata with the clip's duration in whole seconds, bpm / key / time signature N/A)
  through the Qwen encoder's last hidden states; the lyrics (`--lyrics_column`; empty when absent) in its lyrics
  template through the encoder's token embeddings only; timbre from the condition encoder's `silence_latent` (no
  reference audio); context latents = the silence latent tiled over the clip, beside an all-ones chunk mask. The
  null condition (classifier-free guidance, `--condition_dropout`; ACE-Step trained with 0.15) replaces the whole
  packed condition by the learned `null_condition_emb`, as the pipeline's guided branch does.
- Data: stereo at the VAE's rate (a mono clip on both channels), each clip whole (cut to --max_duration_seconds),
  latents from the source's own VAE (its distribution's mode, unscaled: the pipeline decodes them as they are),
  cached with the Qwen states and lyric embeddings.

What trains: the DiT (LoRA with `--use_peft`, or all of it), and the condition encoder with
`--train_condition_encoder` (full fine-tune only). The Qwen text encoder, the tokenizer and the VAE stay frozen
(their outputs are computed once), and so does the scheduler. The export is the source's pipeline with the trained
parts (LoRA merged), the frozen parts copied byte for byte; with `--use_peft` the DiT's adapter is saved beside it in
diffusers' LoRA format (`transformer_lora/pytorch_lora_weights.safetensors`), which `AceStepPipeline.load_lora_weights`
loads onto the source pipeline.

Runs finetune and align: Diffusion-DPO against a frozen reference with the same flow matching, each pair member
conditioned as fine-tuning conditions a clip (its caption formatted with its own duration, the pair's lyrics), the
members of a pair sharing one noise draw and time, the rows grouped by lengths; the export is the same pipeline.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.alignment import with_reference_logps
from hf_audio_trainer.codecs.latents import LatentSpace
from hf_audio_trainer.data.codes import batch_stream
from hf_audio_trainer.data.preferences import preference_pairs, prompt_texts, usable_pairs
from hf_audio_trainer.data.preprocess import encode_dataset, encode_text_states, encode_waves, fingerprint
from hf_audio_trainer.data.text import IDS, STATES, TextConfig, encode_texts, text_of
from hf_audio_trainer.distributed import whole_weights
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families import flow
from hf_audio_trainer.families.base import Checkpoints, Family, class_of
from hf_audio_trainer.families.flow import FlowCollator, LatentData, PairCollator, padded_states
from hf_audio_trainer.families.stable_audio import MonoView, frozen_dtype, say_channels
from hf_audio_trainer.hub import ModelCardText
from hf_audio_trainer.models import load_pretrained, num_parameters
from hf_audio_trainer.objectives import rectified_flow_unit, sd3_times

PIPELINE = "AceStepPipeline"
FROZEN_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # the source's, copied into the export unchanged
OPTIONAL_PARTS = ("audio_tokenizer", "audio_token_detokenizer")  # cover-task modules, copied when the source has them
TRAINED_PARTS = ("transformer", "condition_encoder")
ADAPTER_DIR = "transformer_lora"  # the DiT's LoRA beside a merged export, in diffusers' format
SNAPSHOT_FILES = ["model_index.json", *(f"{p}/*" for p in (*FROZEN_PARTS, *OPTIONAL_PARTS, *TRAINED_PARTS))]
MAX_TEXT_TOKENS, MAX_LYRIC_TOKENS = 256, 2048  # the pipeline's max_text_length / max_lyric_length defaults
TIMBRE_SECONDS = 30  # the pipeline feeds the timbre encoder 30 s of the silence latent when given no reference audio
CAPTION, LYRICS = "ace_caption", "ace_lyrics"
UNREAD = ("timbre_encoder.special_token",)  # a condition encoder weight diffusers' forward never reads
LYRIC_IDS, LYRIC_STATES = "lyric_ids", "lyric_states"


@dataclass
class AceStepConfig:
    """The ace_step family: lyrics, what trains beside the DiT, its timestep density and in-loop sampler."""

    lyrics_column: str = field(
        default="lyrics",
        metadata={
            "help": "Column of each clip's lyrics; a dataset without it trains with empty lyrics (instrumental)."
        },
    )
    vocal_language: str = field(default="en", metadata={"help": "Language code written in the lyrics prompt."})
    train_condition_encoder: bool = field(
        default=False,
        metadata={
            "help": "Also train the condition encoder (text projector, lyric and timbre encoders, null "
            "condition); full fine-tune only."
        },  # fmt: skip
    )
    timestep_mu: float = field(default=-0.4, metadata={"help": "Mean of the logit-normal timestep density."})
    timestep_sigma: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    num_inference_steps: int = field(default=8, metadata={"help": "Sampler steps of in-loop samples."})
    shift: float = field(default=3.0, metadata={"help": "The sampler's schedule shift for in-loop samples."})

    def __post_init__(self) -> None:
        check(bool(self.lyrics_column), "lyrics_column must be a column name")
        check(self.timestep_sigma > 0, f"timestep_sigma={self.timestep_sigma}: must be > 0")
        check(self.num_inference_steps >= 1, f"num_inference_steps={self.num_inference_steps}: must be >= 1")
        check(self.shift > 0, f"shift={self.shift}: must be > 0")


def check_config(cfg) -> None:
    """What this family cannot do with the stage's settings, refused before any work."""
    flow.check_config(cfg)
    check(
        not cfg.text.train_text_encoder,
        "--train_text_encoder: ACE-Step's Qwen text encoder stays frozen (its states are computed once); drop the flag",
    )
    lora = getattr(cfg, "finetune", None) is not None and cfg.finetune.use_peft
    check(
        not (cfg.ace_step.train_condition_encoder and lora),
        "--train_condition_encoder with --use_peft: LoRA adapts the DiT only (the adapter the pipeline's "
        "load_lora_weights reads); drop one of them",
    )
    segment = getattr(cfg.data, "segment_seconds", None)  # align's pair data has none
    check(
        segment is None,
        f"--segment_seconds {segment}: the ace_step family trains each clip whole (its duration is "
        "part of the caption's prompt); cut long clips with --max_duration_seconds instead",
    )


# --------------------------------------------------------------------------------------------------------------------
# The source: an AceStepPipeline folder
# --------------------------------------------------------------------------------------------------------------------


def claims(index: dict) -> bool:
    return class_of(index) == PIPELINE


def local_pipeline(source: str) -> Path:
    """A pipeline folder as it is, or a Hub id's snapshot of the parts a run reads (downloaded once, then cached)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=SNAPSHOT_FILES))
    except Exception as err:  # offline and not cached, no such repo: one answer
        raise ConfigError(
            f"--model_name_or_path {source}: not a folder here, and its Hub snapshot could not be read "
            f"({str(err).splitlines()[0]}); download it first (`hf download {source}`) or pass the folder"
        ) from None


def check_pipeline(folder: Path, name: str) -> dict:
    """Refuse what this family cannot continue, before any work: not an AceStepPipeline, or a part missing."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(
            f"--model_name_or_path {name}: not an AceStepPipeline folder (no model_index.json); pass a diffusers "
            "folder such as ACE-Step/acestep-v15-base-diffusers"
        )
    index = json.loads(index_file.read_text())
    if class_of(index) != PIPELINE:
        raise ConfigError(
            f"--model_name_or_path {name} is a {class_of(index)}; the ace_step family fine-tunes an AceStepPipeline"
        )
    missing = [
        p for p in (*TRAINED_PARTS, *FROZEN_PARTS) if not (index.get(p) or [None])[0] or not (folder / p).is_dir()
    ]
    if missing:
        raise ConfigError(f"--model_name_or_path {name}: its pipeline has no {', '.join(missing)}; pass a whole one")
    return index


def sources(run) -> tuple[Path, Path]:
    """(the pipeline's folder, the folder its frozen parts are read from: on resume the run's own copy)."""
    folder = local_pipeline(str(run.cfg.model.model_name_or_path))
    if run.resume is None:
        check_pipeline(folder, str(run.cfg.model.model_name_or_path))
        return folder, folder
    frozen = Path(run.frozen)
    return folder, frozen if (frozen / "model_index.json").is_file() else folder


def frozen_parts(run, folder: Path):
    """The source's Qwen text encoder, tokenizer and VAE (latents unscaled), frozen, in the run's precision."""
    from diffusers import AutoencoderOobleck
    from transformers import AutoModel, AutoTokenizer

    acc = run.accelerator
    with whole_weights(acc):  # whole, not partitioned under ZeRO-3: it runs before `prepare`
        text_encoder = load_pretrained(AutoModel, str(folder), "the text encoder", subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    vae = load_pretrained(AutoencoderOobleck, str(folder), "an AutoencoderOobleck", subfolder="vae")
    text_encoder = text_encoder.eval().requires_grad_(False)
    text_encoder, vae = (
        module.to(dtype) if (dtype := frozen_dtype(acc, part)) != torch.float32 else module
        for module, part in ((text_encoder, "text_encoder"), (vae, "vae"))
    )
    return text_encoder, tokenizer, LatentSpace(vae, name=f"{folder.name}/vae", what=f"{folder}/vae")


# --------------------------------------------------------------------------------------------------------------------
# Data: stereo latents of whole clips; the caption's Qwen states and the lyrics' token embeddings
# --------------------------------------------------------------------------------------------------------------------


def prompts_for(caption: str, lyrics: str, seconds: float, language: str) -> tuple[str, str]:
    """(caption prompt, lyrics prompt) exactly as `AceStepPipeline` formats them for text2music of `seconds`."""
    from diffusers import AceStepPipeline

    # `_format_prompt` reads only the class's static metadata builder from `self`
    return AceStepPipeline._format_prompt(
        AceStepPipeline, prompt=caption, lyrics=lyrics, vocal_language=language, audio_duration=seconds
    )


def prompt_ids(tokenizer, captions: list[str], lyrics: list[str], seconds: list[float], language: str):
    """Token ids of each clip's caption and lyrics prompts, truncated as the pipeline truncates them."""
    pairs = [prompts_for(c, lyr, s, language) for c, lyr, s in zip(captions, lyrics, seconds, strict=True)]
    text = tokenizer([p[0] for p in pairs], truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]
    lyric = tokenizer([p[1] for p in pairs], truncation=True, max_length=MAX_LYRIC_TOKENS)["input_ids"]
    return text, lyric


class LyricEmbeddings(torch.nn.Module):
    """The text encoder's token embeddings alone: what the pipeline gives the condition encoder for lyrics."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.embed, self.config = text_encoder.get_input_embeddings(), text_encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def lyrics_of(run, split: Dataset, name: str) -> list[str]:
    """Each clip's lyrics; empty (instrumental) when the column is absent, unless the user named it."""
    column = run.cfg.ace_step.lyrics_column
    if column in split.column_names:
        return ["" if v is None else str(v) for v in split[column]]
    if "lyrics_column" in run.cfg.user_set:
        raise ConfigError(
            f"--lyrics_column {column}: the {name} split has no such column (columns: {split.column_names}); name "
            "the lyrics column, or drop the flag to train with empty lyrics"
        )
    if name == "train":
        run.accelerator.print(f"no {column!r} column: every clip trains with empty lyrics (instrumental)")
    return [""] * len(split)


@dataclass
class AceStepData(LatentData):
    """flow's latent data (prompt_states: each validation row's (caption, lyrics), which in-loop samples encode for
    the length they generate), with the pipeline folder whose frozen parts the export keeps; for preference pairs,
    `width`: the longest member's frames, every batch's latent width (so a pair's noise never depends on the pairs
    beside it, and a precomputed reference saw the draw the policy sees)."""

    source: str = ""
    width: int = 0


def preprocess(run, clips: dict[str, Dataset]) -> AceStepData:
    """Both splits' latents (the source's VAE, its channels, whole clips) and their caption states and lyric
    embeddings, computed once on the accelerator across ranks and cached."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    _, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    say_channels(run, clips["train"], latents)
    language, splits, prompts = cfg.ace_step.vocal_language, {}, []
    for name in ("train", "validation"):
        texts, lyrics = text_of(cfg.text, clips[name], name), lyrics_of(run, clips[name], name)
        prompts = texts
        with acc.main_process_first():
            ours = (IDS, STATES, LYRIC_IDS, LYRIC_STATES, CAPTION, LYRICS)
            split = clips[name].remove_columns([c for c in ours if c in clips[name].column_names])
            split = split.add_column(CAPTION, texts).add_column(LYRICS, lyrics)
        split = encode_dataset(
            split, latents, acc, d.audio_column, d.max_duration_seconds, d.preprocessing_num_workers, split=name,
            keep=(CAPTION, LYRICS), cache_dir=d.preprocessing_cache_dir, values="latents",
            channels=latents.audio_channels,
        )  # fmt: skip

        def tokenized(batch: dict) -> dict:
            seconds = [n / latents.frame_rate for n in batch["num_frames"]]
            text, lyric = prompt_ids(tokenizer, batch[CAPTION], batch[LYRICS], seconds, language)
            return {IDS: text, LYRIC_IDS: lyric}

        with acc.main_process_first():
            vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)  # its content: a resume reads it from frozen/
            key = fingerprint("ace_step_prompts", split._fingerprint, vocab, language, latents.frame_rate)
            split = split.map(tokenized, batched=True, desc=f"Prompts of {name}", new_fingerprint=key)
        split = encode_text_states(
            split, text_encoder, acc, IDS, STATES, split=name, cache_dir=d.preprocessing_cache_dir
        )
        splits[name] = encode_text_states(
            split, LyricEmbeddings(text_encoder), acc, LYRIC_IDS, LYRIC_STATES, split=name,
            cache_dir=d.preprocessing_cache_dir,
        )  # fmt: skip
    with acc.main_process_first():
        splits["validation"] = splits["validation"].add_column("row_id", list(range(len(splits["validation"]))))
    longest = max(max(splits["train"]["num_frames"]), max(splits["validation"]["num_frames"]))
    states = list(zip(splits["validation"][CAPTION], splits["validation"][LYRICS], strict=True))
    return AceStepData(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], None,
        longest / latents.frame_rate, prompts, states, {}, source=str(frozen),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The model: the DiT and the condition encoder, reading what the pipeline gives them
# --------------------------------------------------------------------------------------------------------------------


class AceStepModel(torch.nn.Module):
    """`AceStepTransformer1DModel` + `AceStepConditionEncoder` as one network: velocity [B, C, T] of latents x_t
    [B, C, T] at timesteps t [B] in [0, 1], given caption states [B, L, d] (mask), lyric embeddings [B, M, d]
    (mask) and `keep` [B] (0: the null condition). It builds the DiT's inputs exactly as `AceStepPipeline` does for
    text2music without reference audio."""

    # peft's LoRA adapts the DiT only: the condition encoder's attention shares its module names
    lora_exclude_modules = r"condition_encoder\..*"

    def __init__(self, transformer, condition_encoder, frame_rate: float):
        super().__init__()
        self.transformer, self.condition_encoder, self.frame_rate = transformer, condition_encoder, frame_rate

    @property
    def config(self):  # what trackers and the model card read
        return self.transformer.config

    def condition(self, text_states, text_mask, lyric_states, lyric_mask, keep) -> torch.Tensor:
        """The packed cross-attention sequence [B, S, hidden] (the null condition where keep is 0)."""
        encoder, b = self.condition_encoder, text_states.shape[0]
        frames = math.ceil(TIMBRE_SECONDS * self.frame_rate)
        timbre = encoder.silence_latent[:, :frames, :].to(text_states.dtype).expand(b, -1, -1).contiguous()
        states, _ = encoder(
            text_hidden_states=text_states, text_attention_mask=text_mask.bool(), lyric_hidden_states=lyric_states,
            lyric_attention_mask=lyric_mask.bool(), refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.arange(b, device=text_states.device),
        )  # fmt: skip
        null = encoder.null_condition_emb.to(states.dtype).expand_as(states)
        return torch.where(keep.to(states.device)[:, None, None] > 0, states, null)

    def context(self, b: int, frames: int, like: torch.Tensor) -> torch.Tensor:
        """The context latents of text2music: the silence latent tiled over `frames`, beside an all-ones mask."""
        silence = self.condition_encoder.silence_latent
        if silence.shape[1] < frames:
            silence = silence.repeat(1, math.ceil(frames / silence.shape[1]), 1)
        source = silence[:, :frames].to(like.device, like.dtype).expand(b, -1, -1)
        mask = torch.ones(
            b, frames, self.transformer.config.audio_acoustic_hidden_dim, device=like.device, dtype=like.dtype
        )
        return torch.cat([source, mask], dim=-1)

    def forward(self, x_t, timesteps, text_states, text_mask, lyric_states, lyric_mask, keep, states=None,
                groups=None):  # fmt: skip
        """`groups` (the collator's): [(rows, condition length, frames)] of the rows that share their lengths. The
        DiT has no attention mask (self-attention over frames, cross-attention over the packed condition), so each
        group runs alone, cut to its own lengths: a row sees exactly what the pipeline gives it for its clip, whatever
        else is in the batch. None: one group of the whole batch (what the sampler passes)."""
        x = x_t.transpose(1, 2)  # the pipeline's layout: [B, T, C]
        if states is None:
            states = self.condition(text_states, text_mask, lyric_states, lyric_mask, keep)
        t, states = timesteps.to(x.dtype), states.to(x.dtype)
        if groups is None or len(groups) == 1 and groups[0][1:] == (states.shape[1], x.shape[1]):
            return self.velocity(x, t, states).transpose(1, 2)
        out = torch.zeros_like(x)
        for rows, length, frames in groups:
            index = torch.as_tensor(rows, device=x.device)
            out[index, :frames] = self.velocity(x[index, :frames], t[index], states[index, :length])
        return out.transpose(1, 2)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The DiT's velocity [B, T, C] at x [B, T, C], as the pipeline calls it (timestep_r = t: no mean flow)."""
        return self.transformer(
            hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=states,
            context_latents=self.context(x.shape[0], x.shape[1], x), return_dict=False,
        )[0]  # fmt: skip

    def new_like(self) -> AceStepModel:
        """An untrained twin of this configuration on the CPU (what a merged LoRA export loads), drawing nothing from
        training's random stream."""
        with torch.random.fork_rng(devices=[]):
            transformer = type(self.transformer).from_config(self.transformer.config)
            encoder = type(self.condition_encoder).from_config(self.condition_encoder.config)
        return AceStepModel(transformer, encoder, self.frame_rate)

    def save_pretrained(self, folder, state_dict=None, safe_serialization=True, **kwargs) -> None:
        """The pipeline's `transformer/` and `condition_encoder/` folders, from a gathered `state_dict` if given."""
        from safetensors.torch import save_file

        state_dict = self.state_dict() if state_dict is None else state_dict
        for name in TRAINED_PARTS:
            part = {k.split(".", 1)[1]: v.detach().cpu().contiguous() for k, v in state_dict.items()
                    if k.startswith(name + ".")}  # fmt: skip
            target = Path(folder) / name
            getattr(self, name).save_config(target)
            save_file(part, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def build_model(run, data: AceStepData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    """The source's DiT and condition encoder, every weight fitting; the encoder frozen unless it trains."""
    from diffusers import AceStepConditionEncoder, AceStepTransformer1DModel

    folder = local_pipeline(str(model_name_or_path or run.cfg.model.model_name_or_path))
    if run.resume is None and model_name_or_path is not None:
        check_pipeline(folder, str(model_name_or_path))
    transformer = load_pretrained(
        AceStepTransformer1DModel, str(folder), "an AceStepTransformer1DModel", subfolder="transformer"
    )
    encoder = load_pretrained(
        AceStepConditionEncoder, str(folder), "an AceStepConditionEncoder", subfolder="condition_encoder"
    )
    encoder.requires_grad_(run.cfg.ace_step.train_condition_encoder)
    for name, param in encoder.named_parameters():
        if name in UNREAD:  # no gradient ever reaches it: DDP refuses a trained parameter without one
            param.requires_grad_(False)
    if transformer.config.audio_acoustic_hidden_dim != data.latents.channels:
        raise ConfigError(
            f"{folder}'s DiT reads {transformer.config.audio_acoustic_hidden_dim} latent channels but its VAE makes "
            f"{data.latents.channels}: the pipeline's parts do not belong together"
        )
    if getattr(transformer.config, "is_turbo", False) or transformer.config.model_version == "turbo":
        run.accelerator.print(
            f"{folder.name} is a turbo (guidance-distilled, 8-step) checkpoint: this family trains it with the base "
            "model's objective (logit-normal t), which does not keep its distillation; fine-tune a base or SFT "
            "checkpoint to keep classifier-free guidance and many-step sampling"
        )
    return {"model": AceStepModel(transformer, encoder, data.latents.frame_rate)}


# --------------------------------------------------------------------------------------------------------------------
# Batches and loss: flow's collator (logit-normal t, condition dropout) plus the lyrics; flow matching at time t
# --------------------------------------------------------------------------------------------------------------------


class AceStepCollator:
    """flow's batch (latents, frame mask, one noise draw and time per row, `keep`) with the caption states and lyric
    embeddings each padded to the batch's longest, and `groups`: the rows that share their condition length and
    frame count, which the model runs together, each cut to its own lengths (the DiT has no attention mask)."""

    def __init__(self, inner: FlowCollator):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        width = int(batch["text_mask"].sum(1).max())
        batch["text_states"], batch["text_mask"] = batch["text_states"][:, :width], batch["text_mask"][:, :width]
        lyrics = [np.asarray(ex[LYRIC_STATES], dtype=np.float32) for ex in examples]
        batch["lyric_states"], batch["lyric_mask"] = padded_states(lyrics, max(len(x) for x in lyrics))
        # the packed condition of a row: its lyrics, one timbre token (the silence latent), its caption
        lengths = (batch["lyric_mask"].sum(1) + 1 + batch["text_mask"].sum(1)).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(lengths, batch["frame_mask"].sum(1).long().tolist(), strict=True)):
            groups.setdefault(key, []).append(row)
        batch["groups"] = [(rows, length, frames) for (length, frames), rows in groups.items()]
        return batch


def collator(run, data: AceStepData, **kwargs) -> AceStepCollator:
    a = run.cfg.ace_step
    times = sd3_times("logit_normal", a.timestep_mu, a.timestep_sigma, 1.29)
    seed = run.cfg.training.seed
    inner = FlowCollator(data.latents.frame_rate, MAX_TEXT_TOKENS, seed=seed, times=times, width=data.width, **kwargs)
    return AceStepCollator(inner)


class AceStepPairCollator(PairCollator):
    """flow's pairs (B pairs -> 2B rows, chosen first, each pair's members sharing its noise and time) through the
    ace_step collator: each member conditioned on the pair's caption formatted with its own duration, and on the
    pair's lyrics; the rows grouped by lengths as in training."""

    def sequence(self, row: dict, side: str, fixed: bool) -> dict:
        return {
            **super().sequence({**row, STATES: row[f"{side}_{STATES}"]}, side, fixed), LYRIC_STATES: row[LYRIC_STATES]
        }  # fmt: skip


def columns(data: AceStepData, split: str = "train") -> list[str]:
    if data.pairs:
        refs = [c for c in data.train.column_names if c.startswith("ref_")]
        sides = [f"{side}_{c}" for side in ("chosen", "rejected") for c in ("latents", STATES)]
        return [*sides, LYRIC_STATES, "row_id", *refs]
    return ["latents", STATES, LYRIC_STATES, "num_frames", *(["row_id"] if split == "validation" else [])]


def batches(run, data: AceStepData, models, sampler, start_step: int):
    t = run.cfg
    if data.pairs:  # DPO conditions every pair on its prompt: no condition dropout
        collate = AceStepPairCollator(collator(run, data))
    else:
        collate = collator(run, data, dropout=t.text.condition_dropout)
    return batch_stream(
        data.train, sampler, t.training.per_device_train_batch_size, collate, start_step, columns(data),
        positions=True, segment_frames=None, seed=t.training.seed,
    )  # fmt: skip


def velocity_errors(model, batch: dict) -> torch.Tensor:
    """Squared error of the predicted velocity e - x0 at x_t = t e + (1 - t) x0, averaged over channels: [B, T]."""
    x_t, time, target = rectified_flow_unit(batch["latents"], batch["noise"], batch["sigmas"])
    pred = model(
        x_t, time, batch["text_states"], batch["text_mask"], batch["lyric_states"], batch["lyric_mask"], batch["keep"],
        groups=batch["groups"],
    )  # fmt: skip
    return (pred.float() - target.float()).pow(2).mean(1)


def flow_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Sum over unpadded latent frames of the plain velocity error (ACE-Step's MSE); the loop divides by the frames."""
    return (velocity_errors(model, batch) * batch["frame_mask"]).sum(), {}


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Diffusion-DPO's per-sequence terms: -1/2 the mean velocity error over each sequence's frames at its pair's
    shared noise and time (flow's `flow_sequence_logps` with this family's objective and conditioning)."""
    errors, mask = velocity_errors(model, batch), batch["frame_mask"]
    return -0.5 * (errors * mask).sum(1) / mask.sum(1)


def loss(run, data: AceStepData, models):
    return flow_loss


# --------------------------------------------------------------------------------------------------------------------
# Sampling: the pipeline's schedule, Euler steps and APG guidance against the null condition
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latents(model: AceStepModel, text_states, text_mask, lyric_states, lyric_mask, noise: torch.Tensor,
                   guidance: float, steps: int, shift: float) -> torch.Tensor:  # fmt: skip
    """Latents [B, C, T] from `noise` [B, T, C] (the pipeline's layout) as `AceStepPipeline` samples text2music: its
    shifted schedule in [0, 1] through FlowMatchEulerDiscreteScheduler, and for guidance > 1 (not on a turbo
    checkpoint) adaptive projected guidance (momentum -0.75, norm threshold 2.5) against the null condition."""
    from diffusers import AceStepPipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    device = next(model.parameters()).device
    b = noise.shape[0]
    guided = guidance > 1.0 and not getattr(model.transformer.config, "is_turbo", False)
    text_states, text_mask = text_states.to(device), text_mask.to(device)
    lyric_states, lyric_mask = lyric_states.to(device), lyric_mask.to(device)
    states = model.condition(text_states, text_mask, lyric_states, lyric_mask, torch.ones(b, device=device))
    if guided:
        states = torch.cat([states, model.condition_encoder.null_condition_emb.to(states.dtype).expand_as(states)])
    schedule = AceStepPipeline._get_timestep_schedule(None, steps, shift, device, torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    scheduler.set_timesteps(sigmas=schedule.tolist(), device=device)
    momentum = MomentumBuffer(momentum=-0.75) if guided else None
    x = noise.to(device)
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        time = torch.full((inp.shape[0],), float(t), device=device)
        v = model(inp.transpose(1, 2), time, None, None, None, None, None, states=states).transpose(1, 2)
        if guided:
            cond, uncond = v.chunk(2)
            v = normalized_guidance(
                pred_cond=cond, pred_uncond=uncond, guidance_scale=guidance - 1.0, momentum_buffer=momentum, eta=0.0,
                norm_threshold=2.5, use_original_formulation=True, norm_dim=(1,),
            )  # fmt: skip
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.transpose(1, 2).float()


def condition_batch(states: list[tuple[np.ndarray, np.ndarray]]):
    """(caption states, mask, lyric embeddings, mask), each padded to the longest."""
    text, lyrics = [s[0] for s in states], [s[1] for s in states]
    return (*padded_states(text, max(len(x) for x in text)), *padded_states(lyrics, max(len(x) for x in lyrics)))


def generate_waves(run, data: AceStepData, model, prompts: list[tuple[str, str]], seconds: float) -> list[np.ndarray]:
    """Mono waveforms of `seconds` from each validation row's (caption, lyrics), as the exported pipeline makes them:
    the prompts formatted for that duration through the frozen Qwen encoder, then the pipeline's sampler."""
    from hf_audio_trainer.data.text import encode_texts

    a, acc = run.cfg.ace_step, run.accelerator
    captions, lyrics = [p[0] for p in prompts], [p[1] for p in prompts]
    text_ids, lyric_ids = prompt_ids(data.text_tokenizer, captions, lyrics, [seconds] * len(prompts), a.vocal_language)
    encoder = data.text_encoder
    text = encode_texts(encoder, text_ids, acc.device)
    lyric = encode_texts(LyricEmbeddings(encoder), lyric_ids, acc.device)
    encoder.to("cpu")  # it waits on the CPU between evaluations, as preprocessing left it
    frames = max(1, math.ceil(seconds * data.latents.frame_rate))
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    noise = torch.randn(len(prompts), frames, data.latents.channels, generator=generator)
    with acc.autocast():
        x = sample_latents(
            model, *condition_batch(list(zip(text, lyric, strict=True))), noise, run.cfg.text.guidance_scale,
            a.num_inference_steps, a.shift,
        )  # fmt: skip
    audio = MonoView(data.latents.encoder_on(acc.device)).decode(x)
    return [w[: int(seconds * data.latents.sample_rate)].numpy() for w in audio]


def evaluate(run, data: AceStepData, models, loss_fn=None):
    """evaluate(step, suffix, sample): `eval/loss` (the velocity error at each validation clip's fixed noise and
    time) given its caption and lyrics, `eval/loss_uncond` given the null condition; on the `sample` pass, clips
    generated with the pipeline's sampler, scored by FAD (--fad_embedder) and CLAP (--clap_model)."""
    import functools

    return flow.evaluate_latents(
        run, data, models, loss_fn, functools.partial(collator, run, data), functools.partial(generate_waves, run),
        flow_loss, MonoView(data.latents), columns(data, "validation"), pair_collator=AceStepPairCollator,
    )  # fmt: skip


def flops_per_item(models, data: AceStepData) -> float:
    """~6 N per latent frame (the DiT's tokens are two frames: an upper bound), attention's share left out."""
    return 6.0 * num_parameters(models["model"], trainable_only=False)


def describe(data: AceStepData, models) -> str:
    model, latents = models["model"], data.latents
    dtypes = [str(next(m.parameters()).dtype).removeprefix("torch.") for m in (data.text_encoder, latents.vae)]
    what = "preference pairs" if data.pairs else "clips"
    return (
        f"{len(data.train)} train / {len(data.validation)} validation {what} with captions; latents: the source's "
        f"VAE ({latents.audio_channels} audio channels at {latents.sample_rate} Hz), {latents.channels} channels at "
        f"{latents.frame_rate:g} frames/s, whole clips; flow matching at t ~ logit-normal; "
        f"{num_parameters(model):,} parameters ({num_parameters(model, trainable_only=True):,} trained); frozen Qwen "
        f"text encoder in {dtypes[0]}, VAE in {dtypes[1]}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Export: the source's pipeline with the trained DiT (LoRA merged, the adapter beside it) and condition encoder
# --------------------------------------------------------------------------------------------------------------------


def save_parts(run, data: AceStepData, folder: Path) -> None:
    """The source's model_index.json and frozen parts, copied byte for byte (the condition encoder too when it did
    not train)."""
    source, folder = Path(data.source), Path(folder)
    shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    frozen = (*FROZEN_PARTS, *(() if run.cfg.ace_step.train_condition_encoder else ("condition_encoder",)))
    for part in (*frozen, *(p for p in OPTIONAL_PARTS if (source / p).is_dir())):
        shutil.copytree(source / part, folder / part, dirs_exist_ok=True)


def save_dit_adapter(peft_model, state_dict: dict, folder: Path) -> None:
    """The DiT's LoRA in diffusers' format (`transformer.<module>.lora_A.weight` ..., with its LoRA config as
    metadata), so that `AceStepPipeline.load_lora_weights(folder / "transformer_lora")` applies it to the source."""
    from diffusers import AceStepPipeline
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    outer = "base_model.model.transformer."
    strays = [k for k in weights if not k.startswith(outer)]
    if strays:
        raise ConfigError(
            f"--lora_target_modules also adapt the condition encoder ({strays[0]} ...): the adapter the pipeline loads "
            "is the DiT's; target only the DiT's modules (the default: attention and feed-forward)"
        )
    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items() if k != "exclude_modules"}
    AceStepPipeline.save_lora_weights(
        Path(folder) / ADAPTER_DIR,
        transformer_lora_layers={k[len(outer) :]: v.detach().cpu().contiguous() for k, v in weights.items()},
        transformer_lora_adapter_metadata=config,
    )


def export(run, data: AceStepData, models, folder: Path) -> None:
    """An `AceStepPipeline` folder: the trained DiT and condition encoder (gathered under FSDP / ZeRO-3; LoRA
    merged in, the adapter in transformer_lora/), the source's frozen parts and scheduler unchanged."""
    lora = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    ckpt.save_final_model(
        run.accelerator, models["model"], folder, lambda f: save_parts(run, data, f), merge_lora=lora,
        save_adapter=save_dit_adapter,
    )  # fmt: skip


def frozen_files(run, data: AceStepData, models, folder: Path) -> None:
    """The run's frozen parts, stored once (`frozen/`): a resume reads the same latents and text states."""
    save_parts(run, data, folder)


def load_export(folder):
    """The exported pipeline, through diffusers alone."""
    from diffusers import AceStepPipeline

    return AceStepPipeline.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# Align: Diffusion-DPO with ACE-Step's flow matching, the pairs' prompts conditioned as training conditions captions
# --------------------------------------------------------------------------------------------------------------------


def preferences(run) -> AceStepData:
    """The pairs for `align` (TRL's format: `prompt`, `chosen` and `rejected` audio, and lyrics from --lyrics_column
    when present; or the embedded synthetic pairs) as the source's stereo latents (whole clips, cut to
    --max_duration_seconds), each member's caption prompt in the pipeline's template with that member's duration
    through the Qwen encoder, the pair's lyrics prompt through its token embeddings, exactly as `preprocess` does."""
    from hf_audio_trainer.data.audio import decode_audio

    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    _, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    with acc.main_process_first():
        pairs = preference_pairs(d, cfg.training.seed, text_prompts=True)
    max_samples, language = int(d.max_duration_seconds * latents.sample_rate), cfg.ace_step.vocal_language
    splits, prompts, prompt_states = {}, [], []
    for name in ("train", "validation"):
        kept = usable_pairs(pairs[name], name, acc.print)
        captions, lyrics = prompt_texts(kept, name), lyrics_of(run, kept, name)
        split: dict[str, list] = {}
        for side in ("chosen", "rejected"):
            waves = [
                decode_audio(a, latents.sample_rate, where=f"{name} pair {i} ({side})",
                             channels=latents.audio_channels)[..., :max_samples]
                for i, a in enumerate(kept[side])
            ]  # fmt: skip
            with torch.no_grad():
                codes = encode_waves(latents, waves, np.float32)
            seconds = [x.shape[-1] / latents.frame_rate for x in codes]  # as `preprocess` times each clip
            text_ids, lyric_ids = prompt_ids(tokenizer, captions, lyrics, seconds, language)
            split[f"{side}_latents"] = [x.tolist() for x in codes]
            split[f"{side}_{STATES}"] = [s.tolist() for s in encode_texts(text_encoder, text_ids, acc.device)]
        # the lyrics prompt does not depend on the duration: one per pair
        split[LYRIC_STATES] = [s.tolist() for s in encode_texts(LyricEmbeddings(text_encoder), lyric_ids, acc.device)]
        split["row_id"] = list(range(len(kept)))
        splits[name] = Dataset.from_dict(split)
        if name == "validation":
            prompts, prompt_states = captions, list(zip(captions, lyrics, strict=True))
    frames = max(len(x[0]) for s in splits.values() for c in ("chosen_latents", "rejected_latents") for x in s[c])
    return AceStepData(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], None,
        frames / latents.frame_rate, prompts, prompt_states, {}, pairs=True, source=str(frozen), width=frames,
    )  # fmt: skip


def precompute_reference(run, data: AceStepData, reference: torch.nn.Module) -> AceStepData:
    """The reference's Diffusion-DPO terms as columns, computed once at each pair's fixed noise and time."""
    collate = AceStepPairCollator(collator(run, data, fixed=True))
    return with_reference_logps(data, reference, collate, columns(data), run.accelerator, sequence_logps)


ACE_STEP = Family(
    name="ace_step",
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
        "A text-to-music flow-matching model fine-tuned from ACE-Step 1.5 (Qwen3 text encoder, condition encoder for "
        "caption and lyrics, DiT, stereo 48 kHz VAE)",
        "import torch\nfrom diffusers import AceStepPipeline\n\n"
        'pipe = AceStepPipeline.from_pretrained("{repo_id}")\n'
        'audio = pipe("warm lo-fi piano with soft drums", lyrics="", audio_duration=30.0,\n'
        "             generator=torch.Generator().manual_seed(0)).audios[0]  # [2, samples] at 48 kHz",
        pipeline_tag="text-to-audio",
    ),
    lora_target_modules="to_q,to_k,to_v,to_out.0",
    sections={"text": TextConfig, "ace_step": AceStepConfig},
    check_config=check_config,
    checkpoints=Checkpoints("AceStepPipeline (ACE-Step 1.5's flow matching)", claims),
)
