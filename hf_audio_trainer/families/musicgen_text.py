"""Text-conditioned MusicGen: transformers `MusicgenForConditionalGeneration` (a T5 text encoder, an EnCodec codec and
a decoder that cross-attends to the text), in the Hub layout of facebook/musicgen-*.

The model's own `audio_encoder` is the codec: audio becomes codes through it, and the decoder learns the next code
of every codebook given the description. The text encoder is frozen by default, and its outputs are computed once
with the codes. Classifier-free guidance trains the null condition that `generate(guidance_scale > 1)` uses for its
unconditional branch. The export loads with `MusicgenForConditionalGeneration.from_pretrained`, `AutoProcessor`
and `pipeline("text-to-audio")`. Runs pretrain (a new model over an EnCodec of your own) and finetune (a Hub
MusicGen, LoRA or full weights).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
)

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.alignment import tokenize_preferences, with_reference_logps
from hf_audio_trainer.codecs import EncodecTokenizer, TokenizerConfig, load_audio_tokenizer
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches
from hf_audio_trainer.data.preferences import drop_identical_pairs, preference_pairs, prompt_texts, usable_pairs
from hf_audio_trainer.data.preprocess import encode_dataset, encode_text_states
from hf_audio_trainer.data.segments import middle_windows
from hf_audio_trainer.data.text import (
    IDS,
    STATES,
    TextCollator,
    TextConfig,
    TextPairCollator,
    add_states,
    conditioning,
    encode_texts,
    text_of,
)
from hf_audio_trainer.distributed import whole_weights
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families.base import Checkpoints, Family
from hf_audio_trainer.families.musicgen import MODEL_SIZES, LossConfig
from hf_audio_trainer.families.musicgen_hub import (
    codec_of,
    frozen_parts,
    generate_audio,
    load_composite,
    load_processor,
    new_composite,
    new_processor,
    set_generation_config,
)
from hf_audio_trainer.hub import ModelCardText
from hf_audio_trainer.loop import evaluate_conditioned
from hf_audio_trainer.models import num_parameters

# --------------------------------------------------------------------------------------------------------------------
# Data: audio -> codes through the model's codec, text -> token ids (and the frozen encoder's outputs)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TextCodesData:
    """Tokenized splits with their descriptions, the codec and processor that made them, and the model they came
    from (`base`, handed to `build_model` so a large checkpoint is loaded once)."""

    tokenizer: EncodecTokenizer
    processor: MusicgenProcessor
    train: Dataset
    validation: Dataset
    max_positions: int
    base: MusicgenForConditionalGeneration | None
    source: str | None  # what `base` was loaded from
    prompts: list[str]  # the validation descriptions, which in-loop samples are generated from
    pairs: bool = False  # preference pairs (align): prompt text + chosen / rejected codes
    segment_frames: int | None = None  # the training window (None: whole sequences, as preference pairs are)


def preprocess(run, clips: dict[str, Dataset]) -> TextCodesData:
    """Load the model (or the codec of a new one), tokenize the audio with its codec and the text with its processor
    (`build_model` runs the frozen text encoder once over the token ids)."""
    cfg, acc, t = run.cfg, run.accelerator, run.cfg.text
    base, source = None, cfg.model.model_name_or_path
    if source is not None and "tokenizer" in cfg.user_set:
        raise ConfigError(
            f"--tokenizer with --model_name_or_path: {source}'s own audio_encoder is its codec (the decoder reads its "
            "codes); drop --tokenizer"
        )
    if t.instance_prompt is not None and t.text_column in clips["train"].column_names:
        acc.print(f"--instance_prompt replaces the {t.text_column!r} column as every clip's description")
    if source is not None:
        with whole_weights(acc):  # its codec (here) and text encoder (build_model) run before `prepare`
            base = load_composite(source, cfg.model.dropout)
        codec, processor = codec_of(base), load_processor(source)
    elif cfg.tokenizer.tokenizer is not None:
        codec = load_audio_tokenizer(cfg.tokenizer.tokenizer)
        if not isinstance(codec, EncodecTokenizer):
            raise ConfigError(
                f"--tokenizer {cfg.tokenizer.tokenizer} is a {type(codec).__name__}; a "
                "MusicgenForConditionalGeneration carries an EnCodec as its codec: pass an EncodecModel folder (the "
                "output of recipes/codec.py) or Hub id (facebook/encodec_32khz)"
            )
        processor = new_processor(codec.sample_rate)
    else:
        raise ConfigError(
            "--model_family musicgen_text needs a codec: --model_name_or_path a MusicGen (folder or Hub id, e.g. "
            "facebook/musicgen-small), or --tokenizer an EnCodec model for a new one (train one on your data in a "
            "few CPU minutes with recipes/codec.py, then --tokenizer outputs/codec)"
        )
    texts = {name: text_of(t, clips[name], name) for name in ("train", "validation")}
    text_tokenizer = processor.tokenizer
    splits, nulls = {}, {}
    d = cfg.data
    for name in ("train", "validation"):
        ids = [
            text_tokenizer(x, truncation=True, max_length=t.max_text_tokens)["input_ids"] if x else []
            for x in texts[name]
        ]
        nulls[name] = sum(1 for x in ids if not x)
        with acc.main_process_first():
            split = clips[name].remove_columns([c for c in (IDS, STATES) if c in clips[name].column_names])
            split = split.add_column(IDS, ids)
        splits[name] = encode_dataset(
            split, codec, acc, d.audio_column, d.max_duration_seconds, d.preprocessing_num_workers, split=name,
            keep=(IDS,), cache_dir=d.preprocessing_cache_dir,
        )  # fmt: skip
    if any(nulls.values()):
        acc.print(f"rows without a description (trained as the null condition): {nulls}")
    segment_frames = max(1, int(d.window_seconds * codec.frame_rate))
    with acc.main_process_first():
        splits["validation"] = middle_windows(splits["validation"], segment_frames)
    max_positions = segment_frames + codec.num_codebooks + 1
    return TextCodesData(
        codec, processor, splits["train"], splits["validation"], max_positions, base, source, texts["validation"],
        segment_frames=segment_frames,
    )  # fmt: skip


def preferences(run) -> TextCodesData:
    """The pairs for `align`: TRL's format (a text `prompt`, `chosen` and `rejected` audio or `*_codes`), or the
    embedded synthetic pairs (each clean clip's description; the clean clip chosen over a degraded copy), their audio
    tokenized with the policy's codec and their prompts encoded once by its frozen text encoder."""
    cfg, acc, d = run.cfg, run.accelerator, run.cfg.data
    if cfg.text.train_text_encoder:
        raise ConfigError("--train_text_encoder: align keeps the text encoder frozen (the reference shares it)")
    source = cfg.model.model_name_or_path
    with whole_weights(acc):
        base = load_composite(source, cfg.model.dropout)
    codec, processor = codec_of(base), load_processor(source)
    with acc.main_process_first():
        pairs = preference_pairs(d, cfg.training.seed, text_prompts=True)
        if "prompt" not in pairs["train"].column_names:
            raise ConfigError(
                f"the preference dataset needs a text 'prompt' column (TRL's format); found "
                f"{pairs['train'].column_names}"
            )
        splits, prompts = {}, {}
        for name in ("train", "validation"):
            kept = usable_pairs(pairs[name], name, acc.print)
            prompts[name] = prompt_texts(kept, name)
            audio = kept.remove_columns([c for c in ("prompt", "prompt_codes") if c in kept.column_names])
            coded = tokenize_preferences(audio, codec, d.max_duration_seconds, d.preprocessing_num_workers, split=name)
            ids = [
                processor.tokenizer(x, truncation=True, max_length=cfg.text.max_text_tokens)["input_ids"] if x else []
                for x in prompts[name]
            ]
            states = encode_texts(base.text_encoder, ids, acc.device)
            coded = add_states(coded.remove_columns("prompt_codes"), states)
            splits[name], same_codes = drop_identical_pairs(coded)
            if same_codes:
                acc.print(f"skipped {same_codes} {name} pair(s) whose chosen and rejected codes match")
            if len(splits[name]) == 0:
                raise ConfigError(
                    f"every {name} pair's chosen and rejected codes match: the codec cannot tell them apart"
                )
    base.text_encoder.to("cpu")
    frames = max(max(len(c[0]), len(r[0])) for s in splits.values() for c, r in zip(
        s["chosen_codes"], s["rejected_codes"], strict=True
    ))  # fmt: skip
    max_positions = frames + codec.num_codebooks + 1
    return TextCodesData(
        codec, processor, splits["train"], splits["validation"], max_positions, base, source, prompts["validation"],
        pairs=True,
    )  # fmt: skip


def precompute_reference(run, data: TextCodesData, reference: torch.nn.Module) -> TextCodesData:
    """The reference's log-probabilities as columns, computed once (then only the policy stays in memory)."""
    return with_reference_logps(
        data, reference, collator(data, reference), columns(data), run.accelerator, text_sequence_logps
    )


# --------------------------------------------------------------------------------------------------------------------
# Batches: codes as in the musicgen family, plus the text condition (data/text.py)
# --------------------------------------------------------------------------------------------------------------------


def code_logits(model, batch: dict) -> torch.Tensor:
    """The decoder's logits [sequences x codebooks, positions, vocab] for a batch's codes given its text."""
    inputs = dict(decoder_input_ids=batch["input_ids"], decoder_attention_mask=batch["attention_mask"])
    return model(**conditioning(batch), **inputs).logits


def text_lm_loss(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Sum of the per-token cross-entropies of the codes given the text (the loop divides by the token count)."""
    logits = code_logits(model, batch)
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum",
        label_smoothing=label_smoothing,
    )  # fmt: skip
    return loss, {}


def text_sequence_logps(model, batch: dict) -> torch.Tensor:
    """Each sequence's summed log-probability of its codes given its prompt (DPO's policy and reference terms)."""
    logits, labels = code_logits(model, batch).float(), batch["labels"]
    token_logps = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_row = (token_logps * (labels != -100)).sum(-1)  # rows are (sequence, codebook) pairs
    return per_row.view(batch["attention_mask"].shape[0], -1).sum(-1)


def collator(data: TextCodesData, model, **kwargs) -> TextCollator:
    config = getattr(model, "module", model).config.decoder
    codes = CodesCollator(
        data.tokenizer.num_codebooks, config.pad_token_id, config.bos_token_id, data.tokenizer.frame_rate
    )
    if data.pairs:
        return TextPairCollator(codes)
    return TextCollator(codes, STATES in data.train.column_names, **kwargs)


def columns(data: TextCodesData) -> list[str]:
    names = data.train.column_names
    if data.pairs:
        return ["chosen_codes", "rejected_codes", STATES, *[c for c in names if c.startswith("ref_")]]
    extra = ["difficulty"] if "difficulty" in names else []
    return ["codes", STATES if STATES in names else IDS, *extra]


# --------------------------------------------------------------------------------------------------------------------
# What a stage asks of the family
# --------------------------------------------------------------------------------------------------------------------


def build_model(run, data: TextCodesData, model_name_or_path: str | None = None) -> dict[str, torch.nn.Module]:
    cfg = run.cfg
    if model_name_or_path is None:
        with whole_weights(run.accelerator):  # its text encoder runs below, before `prepare`
            model = new_composite(cfg.model.model_size, data.tokenizer, data.max_positions, cfg.model.dropout)
    elif model_name_or_path == data.source and data.base is not None:
        model, data.base = data.base, None  # loaded once, in preprocess
    else:
        with whole_weights(run.accelerator):
            model = load_composite(model_name_or_path, cfg.model.dropout)
        same = model.audio_encoder.state_dict()
        if any(not torch.equal(v, same[k]) for k, v in data.tokenizer.model.state_dict().items()):
            raise ConfigError(
                f"{model_name_or_path} has another codec than {data.source}: the reference and the policy must read "
                "the same codes (pass a reference fine-tuned from the same base model)"
            )
    if model.config.decoder.max_position_embeddings < data.max_positions:
        raise ConfigError(
            f"the model handles {model.config.decoder.max_position_embeddings} positions but clips need "
            f"{data.max_positions}; lower --segment_seconds"
        )
    if not cfg.text.train_text_encoder and STATES not in data.train.column_names:
        # the frozen text encoder's outputs, computed once (then the step reads them instead of running it)
        for name in ("train", "validation"):
            split = encode_text_states(
                getattr(data, name), model.text_encoder, run.accelerator, IDS, STATES, split=name,
                cache_dir=cfg.data.preprocessing_cache_dir,
            )  # fmt: skip
            setattr(data, name, split)
        model.text_encoder.to("cpu")
    frozen_parts(model, cfg.text.train_text_encoder)
    # --guidance_scale reaches a loaded model's generation config only when given (it keeps its own otherwise)
    guidance = cfg.text.guidance_scale if model_name_or_path is None or "guidance_scale" in cfg.user_set else None
    set_generation_config(model, guidance, data.max_positions)
    return {"model": model}


def batches(run, data: TextCodesData, models, sampler, start_step: int):
    t = run.cfg
    collate = collator(
        data, run.accelerator.unwrap_model(models["model"]), dropout=t.text.condition_dropout, seed=t.training.seed
    )
    return batch_stream(
        data.train, sampler, t.training.per_device_train_batch_size, collate, start_step, columns(data), positions=True,
        segment_frames=data.segment_frames, seed=t.training.seed,
    )  # fmt: skip


def loss(run, data: TextCodesData, models):
    return functools.partial(text_lm_loss, label_smoothing=run.cfg.loss.label_smoothing)


def evaluate(run, data: TextCodesData, models, loss_fn=None):
    """evaluate(step, suffix, sample): `eval/loss` given each clip's description and `eval/loss_uncond` given the
    null condition; on the `sample` pass, clips generated from validation descriptions (with --guidance_scale),
    their FAD (--fad_embedder) and CLAP score against their prompts (--clap_model)."""
    from hf_audio_trainer.samples import prompted_sample_metrics

    cfg, acc, model = run.cfg, run.accelerator, models["model"]
    t = cfg.training
    unwrapped = acc.unwrap_model(model)
    with_text = collator(data, unwrapped)
    null = None if data.pairs else collator(data, unwrapped, null=True)

    def generate(m, num_frames: int, rows: list[int]) -> list[np.ndarray]:
        texts = [data.prompts[r] for r in rows]
        return generate_audio(m, texts, data.processor, num_frames, cfg.text.guidance_scale)

    sample_metrics = prompted_sample_metrics(
        acc, cfg.samples, cfg.text.clap_model, data.prompts, generate, data.tokenizer, data.validation, run.out, t.seed
    )

    def stream(collate):
        return lambda: eval_batches(
            data.validation, t.per_device_eval_batch_size, collate, acc.process_index, acc.num_processes,
            columns(data),
        )  # fmt: skip

    return evaluate_conditioned(acc, model, stream(with_text), stream(null), text_lm_loss, loss_fn, sample_metrics)


def flops_per_item(models, data: TextCodesData) -> float:
    """~6 N per position of the decoder (and enc_to_dec_proj), whose positions read all codebooks at once."""
    model = models["model"]
    decoder = num_parameters(getattr(model, "decoder", model), trainable_only=False)
    return 6.0 * decoder / data.tokenizer.num_codebooks


def save_processor(data: TextCodesData, model, folder: Path) -> None:
    """The processor files (text tokenizer + feature extractor) and the generation config, beside the weights."""
    data.processor.save_pretrained(folder)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.save_pretrained(folder)


def frozen_files(run, data: TextCodesData, models, folder: Path) -> None:
    """Stored once per run (with the frozen T5 and EnCodec weights): the config, generation config and processor,
    which `best/` joins in, so that it loads with `from_pretrained` (a full fine-tune's)."""
    model = run.accelerator.unwrap_model(models["model"])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(folder)
    save_processor(data, model, folder)


def export(run, data: TextCodesData, models, folder: Path) -> None:
    """A Hub-layout MusicgenForConditionalGeneration folder with its processor (LoRA adapters merged into a copy)."""
    merge = getattr(run.cfg, "finetune", None) is not None and run.cfg.finetune.use_peft
    model = run.accelerator.unwrap_model(models["model"])
    ckpt.save_final_model(
        run.accelerator, models["model"], folder, lambda f: save_processor(data, model, f), merge_lora=merge
    )


def describe(data: TextCodesData, models) -> str:
    model = models["model"]
    frames = max(max(data.train["num_frames"]), max(data.validation["num_frames"]))
    return (
        f"{len(data.train)} train / {len(data.validation)} validation clips with descriptions, up to {frames} "
        f"frames; {num_parameters(model):,} parameters ({num_parameters(model, trainable_only=True):,} trained)"
    )


def load_export(folder) -> MusicgenForConditionalGeneration:
    return MusicgenForConditionalGeneration.from_pretrained(folder)


MUSICGEN_TEXT = Family(
    name="musicgen_text",
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
    sequence_logps=text_sequence_logps,
    precompute_reference=precompute_reference,
    text_conditioned=True,
    model_card=ModelCardText(
        "A text-to-music model (MusicGen: T5 text encoder, EnCodec codec, decoder)",
        'from transformers import pipeline\n\nsynthesiser = pipeline("text-to-audio", model="{repo_id}")\n'
        'music = synthesiser("lo-fi beats with a mellow piano", forward_params={{"max_new_tokens": 256}})',
        pipeline_tag="text-to-audio",
    ),
    # as musicgen-dreamboothing: the decoder's attention and feed-forward, the text projection and the LM heads
    lora_target_modules="q_proj,k_proj,v_proj,out_proj,fc1,fc2,enc_to_dec_proj,lm_heads",
    sections={"tokenizer": TokenizerConfig, "text": TextConfig, "loss": LossConfig},
    checkpoints=Checkpoints.of_class("MusicgenForConditionalGeneration"),
    model_sizes=tuple(MODEL_SIZES),
)
