"""transformers' text-conditioned MusicGen in the Hub layout of facebook/musicgen-*: `MusicgenForConditionalGeneration`
(T5 text encoder, EnCodec codec, decoder) loaded whole or built new, its processor, and generation with guidance
(audio, or the codes the model sampled), including on-policy preference pairs ranked by a scorer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoProcessor,
    ByT5Tokenizer,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    T5Config,
)

from hf_audio_trainer.alignment import rank_generations, tonal_clarity
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.models import load_pretrained

# A new model's T5 text encoder, by --model_size; narrower than the decoder so `enc_to_dec_proj` exists, as in
# musicgen-small (t5-base 768 -> 1024). ByT5's byte vocabulary: 256 bytes + 3 specials + 125 extra ids.
TEXT_ENCODER_SIZES = {
    "micro": dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
    "tiny": dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "medium": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
}
BYT5_VOCAB = 384
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_composite(model_name_or_path: str) -> None:
    """Refuse, by name, what this family cannot train: a decoder-only MusicGen, MusicGen Melody, stereo MusicGen."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not read a MusicGen config from {model_name_or_path!r}: pass a folder or cached Hub id of a "
            f"MusicgenForConditionalGeneration (config.json with text_encoder, audio_encoder, decoder) ({err})"
        ) from err
    if config.model_type == "musicgen_decoder":
        raise ConfigError(
            f"{model_name_or_path} is a decoder-only MusicGen (MusicgenForCausalLM, no text encoder); train it with "
            "--model_family musicgen"
        )
    if config.model_type == "musicgen_melody":
        raise ConfigError(
            f"{model_name_or_path} is MusicGen Melody (chroma conditioning prepended to the text, another model "
            "class); it is not supported by musicgen_text yet: use facebook/musicgen-small / -medium / -large"
        )
    if config.model_type != "musicgen":
        raise ConfigError(
            f"{model_name_or_path} holds a {config.model_type!r} model, not a MusicgenForConditionalGeneration"
        )
    if config.decoder.audio_channels != 1:
        raise ConfigError(
            f"{model_name_or_path} is a stereo MusicGen (audio_channels={config.decoder.audio_channels}, codebooks "
            "interleaved per channel); only mono checkpoints are supported"
        )


def load_composite(model_name_or_path: str, dropout: float | None = None) -> MusicgenForConditionalGeneration:
    """Every weight of a MusicgenForConditionalGeneration from a folder or Hub id (a missing one is an error);
    `dropout` overrides the decoder's (its layers read it from the config when they are built)."""
    check_composite(model_name_or_path)
    config = MusicgenConfig.from_pretrained(model_name_or_path)
    if dropout is not None:
        decoder = config.decoder
        decoder.dropout = decoder.attention_dropout = decoder.activation_dropout = dropout
    return load_pretrained(
        MusicgenForConditionalGeneration, model_name_or_path, "a MusicgenForConditionalGeneration", config=config
    )


def codec_of(model: MusicgenForConditionalGeneration) -> EncodecTokenizer:
    """The composite's own EnCodec as the audio tokenizer, checked against the decoder's codebooks."""
    decoder = model.config.decoder
    tokenizer = EncodecTokenizer(model.audio_encoder, bandwidth=model.audio_encoder.config.target_bandwidths[0])
    if tokenizer.num_codebooks != decoder.num_codebooks or tokenizer.codebook_size > decoder.vocab_size:
        raise ConfigError(
            f"the codec makes {tokenizer.num_codebooks} codebooks of {tokenizer.codebook_size} but the decoder reads "
            f"{decoder.num_codebooks} of {decoder.vocab_size}: the model's audio_encoder and decoder do not belong "
            "together"
        )
    return tokenizer


def new_composite(
    size: str, codec: EncodecTokenizer, max_positions: int, dropout: float | None = None
) -> MusicgenForConditionalGeneration:
    """A new model of `size` (MODEL_SIZES) around a given EnCodec, with a new T5 encoder over ByT5's bytes."""
    from hf_audio_trainer.families.musicgen import new_model_config  # the decoder sizes (families import this module)

    decoder = new_model_config(size, codec.num_codebooks, codec.codebook_size, max_positions, dropout)
    text = T5Config(vocab_size=BYT5_VOCAB, dropout_rate=0.1 if dropout is None else dropout, **TEXT_ENCODER_SIZES[size])
    config = MusicgenConfig(
        text_encoder=text.to_dict(), audio_encoder=codec.model.config.to_dict(), decoder=decoder.to_dict()
    )
    model = MusicgenForConditionalGeneration(config)
    model.audio_encoder.load_state_dict(codec.model.state_dict())
    # as in the musicgen family: N(0, 1) code embeddings, or the sinusoidal positions drown them out
    for embedding in model.decoder.get_input_embeddings():
        torch.nn.init.normal_(embedding.weight, std=1.0)
    return model


def set_generation_config(
    model: MusicgenForConditionalGeneration, guidance_scale: float | None, max_positions: int
) -> None:
    """What `generate` and the pipeline use. A loaded model keeps its own (facebook/musicgen-small's length, top-k,
    guidance), with `guidance_scale` if given; a new one samples with guidance, BOS = pad = one past the last code."""
    config = model.generation_config
    if config.decoder_start_token_id is not None:  # a loaded model's own
        if guidance_scale is not None:
            config.guidance_scale = guidance_scale
        return
    bos = model.config.decoder.bos_token_id
    model.generation_config = GenerationConfig(
        do_sample=True,
        guidance_scale=3.0 if guidance_scale is None else guidance_scale,
        max_length=max_positions,
        decoder_start_token_id=bos,
        pad_token_id=model.config.decoder.pad_token_id,
        bos_token_id=bos,
    )


def frozen_parts(model: MusicgenForConditionalGeneration, train_text_encoder: bool) -> None:
    """The codec never trains (the codes are its output); the text encoder only with --train_text_encoder."""
    model.audio_encoder.requires_grad_(False)
    model.text_encoder.requires_grad_(train_text_encoder)


def new_processor(sample_rate: int) -> MusicgenProcessor:
    """ByT5's byte-level tokenizer (no vocabulary file, nothing to download) and EnCodec's feature extractor."""
    return MusicgenProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=sample_rate), ByT5Tokenizer())


def load_processor(model_name_or_path: str):
    folder = Path(model_name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ConfigError(
            f"{model_name_or_path} has no processor files ({' or '.join(PROCESSOR_FILES)} and the text tokenizer): "
            "copy them from the base model (AutoProcessor.from_pretrained(base).save_pretrained(folder))"
        )
    try:
        return AutoProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load the processor (text tokenizer) of {model_name_or_path!r}: {err}") from err


def generate_audio(model, texts: list[str], processor, num_frames: int, guidance_scale: float) -> list[np.ndarray]:
    """Mono waveforms of `num_frames` code frames for each description, through the model's own `generate`."""
    device = next(model.parameters()).device
    inputs = processor(text=texts, padding=True, return_tensors="pt").to(device)
    k = model.config.decoder.num_codebooks
    was_training = model.training
    model.eval()
    audio = model.generate(
        **inputs, do_sample=True, guidance_scale=guidance_scale, max_new_tokens=num_frames + k - 1
    )  # the delay pattern needs k - 1 more steps to finish every codebook
    model.train(was_training)
    return [a[0].float().cpu().numpy() for a in audio]


@contextlib.contextmanager
def returning_codes(model: MusicgenForConditionalGeneration):
    """Inside, the model's `generate` returns its codes [batch, 1, codebooks, frames] instead of audio: transformers
    always decodes them with the audio encoder and keeps no copy, and DPO needs the codes the model sampled."""
    codec = model.audio_encoder
    codec.decode = lambda codes, audio_scales=None, **kwargs: SimpleNamespace(audio_values=codes[0][:, None])
    try:
        yield
    finally:
        del codec.decode  # the class's method again


def make_text_preference_pairs(
    model, processor, prompts: list[str], scorer=None, num_samples: int = 4, seconds: float = 1.0,
    guidance_scale: float = 3.0,
) -> Dataset:  # fmt: skip
    """CRPO pairs for `align --model_family musicgen_text --dataset_name` (save the result with save_to_disk):
    `num_samples` guided generations per prompt, scored by `scorer(waves, sample_rate, texts)` (a `ClapScorer`
    for text adherence; default: `tonal_clarity`, an acoustic score that ignores the text), best vs worst."""
    codec = codec_of(model)
    frames = max(1, round(seconds * codec.frame_rate))

    def generate(texts: list[str]) -> list[torch.Tensor]:
        with returning_codes(model):
            codes = generate_audio(model, texts, processor, frames, guidance_scale)
        return [torch.from_numpy(c).long().clamp(0, codec.codebook_size - 1) for c in codes]

    def score(waves: list[np.ndarray], texts: list[str]) -> np.ndarray:
        if scorer is None:
            return np.asarray([tonal_clarity(w, codec.sample_rate) for w in waves])
        return scorer(waves, codec.sample_rate, texts)

    return rank_generations(prompts, generate, lambda c: codec.decode(c).numpy(), score, num_samples)
