"""Stable Audio: fine-tune Stable Audio Open 1.0 from its diffusers folder, with the objective it was trained with.

The checkpoint is a `StableAudioPipeline` sampling with `CosineDPMSolverMultistepScheduler`
(stabilityai/stable-audio-open-1.0, or a folder this family exported). Its DiT and conditioners train as the flow
family's `FlowModel` (conditioning built exactly as the pipeline builds it), under the objective of stable-audio-tools'
release config: the v-objective over the cosine schedule, t uniform on [0, 1], plain MSE, t itself fed to the DiT
(`objectives.v_cosine`, the scheduler's model in sigma space). Data as the model was trained: stereo at the VAE's
rate (a mono clip on both channels), windows of the DiT's `sample_size` latent frames, a short clip encoded with the
silence after it (which stays in the loss: the model learns to end), seconds_start the window's offset (floor) and
seconds_total the clip's duration (ceil), latents from the source's own VAE, unscaled and cached. The frozen parts
(T5, tokenizer, VAE, scheduler) are the source's, copied unchanged into the export; LoRA (`--use_peft`, on the DiT's
attention and feed-forward) is merged into it and saved beside it as a peft adapter (`transformer_lora/`), since
diffusers has no LoRA loader for `StableAudioDiTModel`. Runs finetune and align (Diffusion-DPO).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
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
from hf_audio_trainer.data.segments import take_window
from hf_audio_trainer.data.text import IDS, STATES, TextConfig, text_of
from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.families import flow
from hf_audio_trainer.families.base import Checkpoints, Family, class_of
from hf_audio_trainer.families.flow import FlowCollator, LatentData, PairCollator, padded_states, sample_latents
from hf_audio_trainer.hub import ModelCardText
from hf_audio_trainer.models import num_parameters
from hf_audio_trainer.objectives import uniform_times, v_cosine

SCHEDULER = "CosineDPMSolverMultistepScheduler"
FROZEN_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # the source's, copied into the export unchanged
TRAINED_PARTS = ("transformer", "projection_model")
ADAPTER_DIR = "transformer_lora"  # the DiT's LoRA adapter beside a merged export (peft's format)
# the parts of a Hub snapshot a run reads (the repo's single-file checkpoints for stable-audio-tools are not)
SNAPSHOT_FILES = ["model_index.json", *(f"{part}/*" for part in (*FROZEN_PARTS, *TRAINED_PARTS))]


@dataclass
class StableAudioConfig:
    """The stable_audio family: Stable Audio Open's sampler for in-loop samples (its objective has no settings)."""

    num_inference_steps: int = field(
        default=100,
        metadata={"help": "Steps of the source's scheduler (CosineDPMSolverMultistepScheduler) for in-loop samples."},
    )

    def __post_init__(self) -> None:
        check(self.num_inference_steps >= 1, f"num_inference_steps={self.num_inference_steps}: must be >= 1")


def check_config(cfg) -> None:
    """What this family cannot do with the stage's settings, refused before any work."""
    flow.check_config(cfg)
    check(
        not cfg.text.train_text_encoder,
        "--train_text_encoder: Stable Audio Open's T5 stays frozen (its states are computed once); drop the flag",
    )


# --------------------------------------------------------------------------------------------------------------------
# The source: a StableAudioPipeline trained with the v-objective
# --------------------------------------------------------------------------------------------------------------------


def claims(index: dict) -> bool:
    """A StableAudioPipeline sampling with CosineDPMSolverMultistepScheduler (what `Family.checkpoints` tests)."""
    return class_of(index) == "StableAudioPipeline" and (index.get("scheduler") or ["", ""])[1] == SCHEDULER


def local_pipeline(source: str, patterns: list[str] | None = None) -> Path:
    """A pipeline folder as it is, or a Hub id's snapshot of the parts a run reads (`patterns`, default Stable Audio
    Open's; downloaded once, then cached)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns or SNAPSHOT_FILES))
    except Exception as err:  # offline and not cached, no such repo, gated without a token: one answer
        raise ConfigError(
            f"--model_name_or_path {source}: not a folder here, and its Hub snapshot could not be read "
            f"({str(err).splitlines()[0]}); download it first (`hf download {source}`, after accepting its license) "
            "or pass the folder"
        ) from None


def check_pipeline(folder: Path, name: str) -> dict:
    """Refuse what this family cannot continue (before any work): not a StableAudioPipeline, a part missing, another
    sampler or objective, or no torchsde (without it diffusers only has a placeholder for the scheduler). Returns
    the pipeline's model_index.json."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(
            f"--model_name_or_path {name}: not a StableAudioPipeline folder (no model_index.json); pass a diffusers "
            "folder such as stabilityai/stable-audio-open-1.0"
        )
    index = json.loads(index_file.read_text())
    if class_of(index) != "StableAudioPipeline":
        raise ConfigError(
            f"--model_name_or_path {name} is a {class_of(index)}; the stable_audio family fine-tunes a "
            "StableAudioPipeline (stabilityai/stable-audio-open-1.0)"
        )
    missing = [p for p in (*TRAINED_PARTS, *FROZEN_PARTS) if p not in index or not (folder / p).is_dir()]
    if missing:
        raise ConfigError(f"--model_name_or_path {name}: its pipeline has no {', '.join(missing)}; pass a whole one")
    scheduler = (index.get("scheduler") or [None, None])[1]
    if scheduler != SCHEDULER:
        raise ConfigError(
            f"--model_name_or_path {name} samples with {scheduler}, not Stable Audio Open's {SCHEDULER}: it was not "
            "trained with the v-objective; fine-tune it with --model_family flow"
        )
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if config.get("prediction_type", "v_prediction") != "v_prediction" or config.get("sigma_data", 1.0) != 1.0:
        raise ConfigError(
            f"{name}'s scheduler predicts {config.get('prediction_type')} with sigma_data {config.get('sigma_data')}: "
            "the stable_audio family trains v_prediction with sigma_data 1 (Stable Audio Open's); fix its "
            "scheduler_config.json or start from Stable Audio Open"
        )
    if importlib.util.find_spec("torchsde") is None:
        raise ConfigError(f"{SCHEDULER} needs torchsde, which is not installed: pip install torchsde")
    return index


def window_frames(run, folder: Path, frame_rate: float) -> int:
    """The training window: the DiT's `sample_size` (what the pipeline generates), or --segment_seconds within it."""
    sample_size = int(json.loads((folder / "transformer" / "config.json").read_text())["sample_size"])
    seconds = run.cfg.data.segment_seconds
    if seconds is None:
        return sample_size
    frames = max(1, int(seconds * frame_rate))
    check(
        frames <= sample_size,
        f"segment_seconds={seconds:g}: the DiT generates at most {sample_size} latent frames "
        f"({sample_size / frame_rate:.2f} s); lower --segment_seconds or leave it unset",
    )
    return frames


def frozen_dtype(accelerator, part: str) -> torch.dtype:
    """The dtype a frozen part runs in: the mixed-precision one (no fp32 copy to keep), except T5 under fp16, whose
    activations overflow in half precision (transformers' T5 fp16 warning)."""
    precision = accelerator.mixed_precision
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and part != "text_encoder":
        return torch.float16
    return torch.float32


def frozen_parts(run, folder: Path):
    """The source's T5, tokenizer and VAE (its latents unscaled), the frozen ones in the run's precision."""
    from diffusers import AutoencoderOobleck

    from hf_audio_trainer.models import load_pretrained

    acc = run.accelerator
    text_encoder, tokenizer = flow.text_parts(run, str(folder))
    vae = load_pretrained(AutoencoderOobleck, str(folder), "an AutoencoderOobleck", subfolder="vae")
    text_encoder, vae = (
        module.to(dtype) if (dtype := frozen_dtype(acc, part)) != torch.float32 else module
        for module, part in ((text_encoder, "text_encoder"), (vae, "vae"))
    )  # a cast to float32 would only make diffusers warn
    return text_encoder, tokenizer, LatentSpace(vae, name=f"{folder.name}/vae", what=f"{folder}/vae")


@dataclass
class PipelineData(LatentData):
    """flow's latent data, with the pipeline folder whose frozen parts the export keeps."""

    source: str = ""


def sources(run) -> tuple[Path, Path]:
    """(the pipeline's folder, the folder its frozen parts are read from: on resume the run's own copy, `run.frozen`,
    so a resume reads the latents and text states it was trained on)."""
    folder = local_pipeline(str(run.cfg.model.model_name_or_path))
    if run.resume is None:
        check_pipeline(folder, str(run.cfg.model.model_name_or_path))
        return folder, folder
    frozen = Path(run.frozen)
    return folder, frozen if (frozen / "model_index.json").is_file() else folder


# --------------------------------------------------------------------------------------------------------------------
# Data: stereo latents of windows of the DiT's length (silence after a short clip), the T5's states
# --------------------------------------------------------------------------------------------------------------------


def say_channels(run, clips: Dataset, latents: LatentSpace) -> None:
    """One line when the data is mono and the VAE reads stereo (each clip is then duplicated to both channels)."""
    from hf_audio_trainer.data.audio import channel_count

    if latents.audio_channels > 1 and len(clips) and channel_count(clips[0][run.cfg.data.audio_column]) == 1:
        run.accelerator.print(
            f"the audio is mono (train row 0) and the VAE reads {latents.audio_channels} channels: each mono clip is "
            "duplicated to every channel"
        )


def middle_windows(split: Dataset, frames: int) -> Dataset:
    """Each clip's middle window of `frames` (a short clip is one already, with its silence), and its offset."""

    def cut(batch: dict) -> dict:
        latents, starts = [], []
        for x in batch["latents"]:
            start = max(len(x[0]) - frames, 0) // 2
            latents.append(take_window(x, start, frames))
            starts.append(start)
        return {"latents": latents, "window_start": starts}

    return split.map(cut, batched=True, batch_size=256, desc="Cutting validation clips to their middle window")


def preprocess(run, clips: dict[str, Dataset]) -> PipelineData:
    """Both splits' latents (the source's VAE, its channels, windows of the DiT's length) and their descriptions'
    T5 states, computed once on the accelerator across ranks and cached."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    folder, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    window = window_frames(run, folder, latents.frame_rate)
    say_channels(run, clips["train"], latents)
    splits, prompts = {}, []
    for name in ("train", "validation"):
        texts = text_of(cfg.text, clips[name], name)
        prompts = texts
        with acc.main_process_first():
            split = clips[name].remove_columns([c for c in (IDS, STATES) if c in clips[name].column_names])
            split = split.add_column(IDS, flow.token_ids(tokenizer, texts))
        split = encode_dataset(
            split, latents, acc, d.audio_column, d.max_duration_seconds, d.preprocessing_num_workers, split=name,
            keep=(IDS,), cache_dir=d.preprocessing_cache_dir, values="latents", channels=latents.audio_channels,
            pad_to_samples=window * latents.hop_length,
        )  # fmt: skip
        splits[name] = encode_text_states(
            split, text_encoder, acc, IDS, STATES, split=name, cache_dir=d.preprocessing_cache_dir
        )
    with acc.main_process_first():
        validation = middle_windows(splits["validation"], window)
        splits["validation"] = validation.add_column("row_id", list(range(len(validation))))
    longest = max(max(splits["train"]["num_samples"]), max(splits["validation"]["num_samples"]))
    states = [np.asarray(s, dtype=np.float32) for s in splits["validation"][STATES]]
    return PipelineData(
        latents, text_encoder.to("cpu"), tokenizer, splits["train"], splits["validation"], window,
        longest / latents.sample_rate, prompts, states, {}, source=str(frozen),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Batches and loss: flow's collator with uniform times and whole seconds, the v-objective
# --------------------------------------------------------------------------------------------------------------------


def whole_seconds(sample_rate: int, frame_rate: float):
    """(seconds start, seconds total) as stable-audio-tools computes them: the window's offset rounded down and the
    clip's duration rounded up, in whole seconds (the pipeline then asks for any float)."""

    def seconds(example: dict, frames: int) -> tuple[float, float]:
        start = math.floor(example.get("window_start", 0) / frame_rate)
        if example.get("num_samples") is not None:
            return float(start), float(math.ceil(example["num_samples"] / sample_rate))
        return float(start), float(math.ceil(example.get("num_frames", frames) / frame_rate))

    return seconds


def collator(run, data: PipelineData, **kwargs) -> FlowCollator:
    latents = data.latents
    return FlowCollator(
        latents.frame_rate, data.text_tokenizer.model_max_length, seed=run.cfg.training.seed, times=uniform_times,
        seconds=whole_seconds(latents.sample_rate, latents.frame_rate), **kwargs,
    )  # fmt: skip


def columns(data: PipelineData, split: str = "train") -> list[str]:
    """What a batch reads: latents, text states, the clip's length; validation rows also their row and window."""
    if data.pairs:
        return flow.columns(data, split)
    where = ["row_id", "window_start"] if split == "validation" else []
    return ["latents", STATES, "num_frames", "num_samples", *where]


def batches(run, data: PipelineData, models, sampler, start_step: int):
    t = run.cfg
    if data.pairs:  # DPO conditions every pair on its prompt: no condition dropout
        collate = PairCollator(collator(run, data))
    else:
        collate = collator(run, data, dropout=t.text.condition_dropout)
    return batch_stream(
        data.train, sampler, t.training.per_device_train_batch_size, collate, start_step, columns(data),
        positions=True, segment_frames=None if data.pairs else data.segment_frames, seed=t.training.seed,
    )  # fmt: skip


v_loss = functools.partial(flow.flow_loss, objective=v_cosine)
v_sequence_logps = functools.partial(flow.flow_sequence_logps, objective=v_cosine)


def loss(run, data: PipelineData, models):
    return v_loss


# --------------------------------------------------------------------------------------------------------------------
# The model, evaluation and in-loop samples
# --------------------------------------------------------------------------------------------------------------------


def build_model(run, data: PipelineData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    """The source's DiT and conditioners, every weight fitting (a missing or mis-shaped one is refused)."""
    folder = local_pipeline(str(model_name_or_path or run.cfg.model.model_name_or_path))
    if run.resume is None and model_name_or_path is not None:
        check_pipeline(folder, str(model_name_or_path))
    model = flow.load_pipeline_model(str(folder))
    if model.transformer.config.in_channels != data.latents.channels:
        raise ConfigError(
            f"{folder}'s DiT reads {model.transformer.config.in_channels} latent channels but its VAE makes "
            f"{data.latents.channels}: the pipeline's parts do not belong together"
        )
    return {"model": model}


def source_scheduler(data: PipelineData):
    """The source's own scheduler (what the export samples with)."""
    from diffusers import CosineDPMSolverMultistepScheduler

    return CosineDPMSolverMultistepScheduler.from_pretrained(data.source, subfolder="scheduler")


class MonoView:
    """A latent space whose decoded audio is averaged to mono: what the FAD and CLAP embedders read."""

    def __init__(self, latents: LatentSpace):
        self.latents, self.sample_rate, self.frame_rate = latents, latents.sample_rate, latents.frame_rate

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        audio = self.latents.decode(x)
        return audio.mean(-2) if self.latents.audio_channels > 1 else audio


def generate_waves(run, data: PipelineData, model, texts_states: list[np.ndarray], seconds: float) -> list[np.ndarray]:
    """Mono waveforms of `seconds` from each text state, as the exported pipeline makes them: a window of the DiT's
    length through the source's scheduler (its SDE noise seeded from torch's generator), cut to `seconds`."""
    states, mask = padded_states(texts_states, data.text_tokenizer.model_max_length)
    seconds = min(seconds, data.segment_frames / data.latents.frame_rate)
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    with run.accelerator.autocast():
        x = sample_latents(
            model, states, mask, seconds, data.segment_frames, data.latents.channels, run.cfg.text.guidance_scale,
            run.cfg.stable_audio.num_inference_steps, generator=generator, scheduler=source_scheduler(data),
        )  # fmt: skip
    audio = MonoView(data.latents.encoder_on(run.accelerator.device)).decode(x)
    return [w[: int(seconds * data.latents.sample_rate)].numpy() for w in audio]


def evaluate(run, data: PipelineData, models, loss_fn=None):
    """evaluate(step, suffix, sample): `eval/loss` (the v error at each validation window's fixed noise and time)
    given the descriptions, `eval/loss_uncond` given the null condition; on the `sample` pass, clips generated from
    validation descriptions with the source's scheduler, scored by FAD (--fad_embedder) and CLAP (--clap_model)."""
    return flow.evaluate_latents(
        run, data, models, loss_fn, functools.partial(collator, run, data), functools.partial(generate_waves, run),
        v_loss, MonoView(data.latents), columns(data, "validation"),
    )  # fmt: skip


def flops_per_item(models, data: PipelineData) -> float:
    """~6 N per latent frame (the DiT's tokens), attention's share left out."""
    return 6.0 * num_parameters(models["model"], trainable_only=False)


def describe(data: PipelineData, models) -> str:
    model, latents = models["model"], data.latents
    window = "" if data.segment_frames is None else f"windows of {data.segment_frames} frames; "
    dtypes = [str(next(m.parameters()).dtype).removeprefix("torch.") for m in (data.text_encoder, latents.vae)]
    return (
        f"{len(data.train)} train / {len(data.validation)} validation clips with descriptions; latents: the source's "
        f"VAE ({latents.audio_channels} audio channels at {latents.sample_rate} Hz), {latents.channels} channels at "
        f"{latents.frame_rate:g} frames/s; {window}v-objective over the cosine schedule; "
        f"{num_parameters(model):,} parameters ({num_parameters(model, trainable_only=True):,} trained); frozen T5 "
        f"in {dtypes[0]}, VAE in {dtypes[1]}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Export: the source's pipeline with the trained DiT and conditioners (LoRA merged, the adapter beside it)
# --------------------------------------------------------------------------------------------------------------------


def save_parts(data: PipelineData, folder: Path) -> None:
    """The source's model_index.json and frozen parts, copied byte for byte."""
    source, folder = Path(data.source), Path(folder)
    shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    for part in FROZEN_PARTS:
        shutil.copytree(source / part, folder / part, dirs_exist_ok=True)


def save_dit_adapter(peft_model, state_dict: dict, folder: Path) -> None:
    """The DiT's LoRA adapter in peft's format, keyed for the pipeline's `transformer` alone, so that
    `PeftModel.from_pretrained(pipe.transformer, folder / "transformer_lora")` applies it to the source."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    outer, inner = "base_model.model.transformer.", "base_model.model."
    strays = [k for k in weights if not k.startswith(outer)]
    if strays:
        raise ConfigError(
            f"--lora_target_modules also adapt the conditioners ({strays[0]} ...): the adapter beside the export is "
            "the DiT's; target only the DiT's modules (the default: attention and feed-forward)"
        )
    target = Path(folder) / ADAPTER_DIR
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(target))
    tensors = {inner + k[len(outer) :]: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})


def export(run, data: PipelineData, models, folder: Path) -> None:
    """A `StableAudioPipeline` folder: the trained DiT and conditioners (gathered under FSDP / ZeRO-3; LoRA merged
    in, the adapter in transformer_lora/), the source's frozen parts and scheduler unchanged."""
    lora = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    ckpt.save_final_model(
        run.accelerator, models["model"], folder, lambda f: save_parts(data, f), merge_lora=lora,
        save_adapter=save_dit_adapter,
    )  # fmt: skip


def frozen_files(run, data: PipelineData, models, folder: Path) -> None:
    """The run's frozen parts, stored once (`frozen/`): a resume reads the same latents and text states."""
    save_parts(data, folder)


def load_export(folder):
    """The exported pipeline, through diffusers alone."""
    from diffusers import StableAudioPipeline

    return StableAudioPipeline.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# Align: Diffusion-DPO with the v-objective
# --------------------------------------------------------------------------------------------------------------------


def preferences(run) -> PipelineData:
    """The pairs for `align` (TRL's format, or the embedded synthetic pairs) as the source's stereo latents, their
    prompts as its T5's states."""
    folder, frozen = sources(run)
    text_encoder, tokenizer, latents = frozen_parts(run, frozen)
    return flow.preference_latents(
        run, text_encoder, tokenizer, latents, {}, channels=latents.audio_channels, data_class=PipelineData,
        source=str(frozen),
    )  # fmt: skip


def precompute_reference(run, data: PipelineData, reference: torch.nn.Module) -> PipelineData:
    """The reference's Diffusion-DPO terms as columns, computed once at each pair's fixed noise and time."""
    return flow.reference_columns(run, data, reference, collator(run, data, fixed=True), v_sequence_logps)


STABLE_AUDIO = Family(
    name="stable_audio",
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
    sequence_logps=v_sequence_logps,
    precompute_reference=precompute_reference,
    text_conditioned=True,
    model_card=ModelCardText(
        "A text-to-audio latent diffusion model fine-tuned from Stable Audio Open (T5 text encoder, DiT, stereo VAE)",
        "import torch\nfrom diffusers import StableAudioPipeline\n\n"
        'pipe = StableAudioPipeline.from_pretrained("{repo_id}")\n'
        'audio = pipe("a warm pad with slow chords", audio_end_in_s=10.0, num_inference_steps=100,\n'
        "             generator=torch.Generator().manual_seed(0)).audios[0]  # [2, samples] at 44.1 kHz",
        pipeline_tag="text-to-audio",
    ),
    lora_target_modules="to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2",
    sections={"text": TextConfig, "stable_audio": StableAudioConfig},
    check_config=check_config,
    checkpoints=Checkpoints(f"StableAudioPipeline sampling with {SCHEDULER} (Stable Audio Open's v-objective)", claims),
)
