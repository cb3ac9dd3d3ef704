"""A tiny random AceStepPipeline in ACE-Step 1.5's diffusers layout, built offline, and quick-run settings for it."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import DESCRIPTION_WORDS, quick_run

ENDOFTEXT = "<|endoftext|>"  # Qwen's end-of-text token: the pipeline's prompts end with it, and it pads


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer in Qwen's shape (its `<|endoftext|>` both ends prompts and pads), trained here on
    the pipeline's prompt template and the synthetic descriptions: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n# Caption\n",
        "# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n",
        "# Languages\nen\n\n# Lyric\n[verse]\nla la la, sing along\n[chorus]\n",
        " ".join(DESCRIPTION_WORDS),
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?-#[]()\n",
    ]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    model.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, model_max_length=256
    )


def tiny_ace_step(folder: Path, seed: int = 0, turbo: bool = False) -> Path:
    """A tiny random AceStepPipeline (diffusers' own test sizes): a 2-layer DiT over 8 latent channels, the condition
    encoder (its silence latent drawn, as the converter's real one is not zeros), a tiny Qwen3Model text encoder with
    `tiny_qwen_tokenizer`, a stereo AutoencoderOobleck at 16 kHz with a hop of 640 samples (25 latent frames/s, as
    ACE-Step's 48 kHz / 1920) and 8 latent channels (its encoder makes 16: mean and scale), and the pipeline's
    scheduler (FlowMatchEulerDiscreteScheduler, num_train_timesteps 1, shift 1), saved with save_pretrained."""
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    shared = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0, sliding_window=16)
    transformer = AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, in_channels=24, audio_acoustic_hidden_dim=8,
        patch_size=2, is_turbo=turbo, **shared,
    )  # fmt: skip
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )
    condition_encoder = AceStepConditionEncoder(
        hidden_size=32, intermediate_size=64, text_hidden_dim=32, timbre_hidden_dim=8,
        num_lyric_encoder_hidden_layers=2, num_timbre_encoder_hidden_layers=2, **shared,
    )  # fmt: skip
    with torch.no_grad():  # a silence latent that is not all zeros, as the converter's real one
        condition_encoder.silence_latent.normal_(0.0, 0.1)
    vae = AutoencoderOobleck(
        encoder_hidden_size=16, downsampling_ratios=[4, 4, 5, 8], channel_multiples=[1, 1, 1, 1],
        decoder_channels=4, decoder_input_channels=8, audio_channels=2, sampling_rate=16000,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)  # ACE-Step's: t in [0, 1] as it is
    pipe = AceStepPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        condition_encoder=condition_encoder, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def ace_step_quick_run(source: Path, output_dir: Path, **overrides) -> dict:
    """quick_run for fine-tuning `tiny_ace_step` (its family comes from its class): clips cut to 1 s, no EMA, so runs
    end where the weights are."""
    run = quick_run(None, output_dir, model_name_or_path=str(source), learning_rate=3e-3, ema=False)
    del run["tokenizer"]
    return {**run, "final_model": "raw", "max_duration_seconds": 1.0, "synthetic_num_clips": 16, **overrides}
