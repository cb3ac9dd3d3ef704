"""Shared pieces of the end-to-end tests: a small fitted tokenizer and quick run settings."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
NUM_CLIPS = 64


def fit_small_tokenizer(folder: Path) -> Path:
    """A 2 x 64 mel k-means tokenizer on the synthetic clips the runs use (fitting it once keeps tests quick)."""
    train = make_synthetic_dataset(num_clips=NUM_CLIPS, seed=0)["train"]
    waves = [a["array"] for a in train["audio"]]
    MelKMeansTokenizer.fit(waves, sample_rate=16000, num_codebooks=2, codebook_size=64, seed=0).save_pretrained(folder)
    return folder


def quick_run(tokenizer: Path, output_dir: Path, **overrides) -> dict:
    """Settings for a few-step run on the synthetic data with a tiny model."""
    return {
        "synthetic_num_clips": NUM_CLIPS,
        "tokenizer": str(tokenizer),
        "output_dir": str(output_dir),
        "report_to": "none",
        "logging_steps": 1,
        "eval_steps": 0,
        "eval_on_start": False,
        "save_steps": 1000,
        "learning_rate": 2e-3,
        "warmup_steps": 2 if overrides.get("max_steps", -1) < 0 else min(2, overrides["max_steps"]),  # never longer
        "dropout": 0.0,
        **overrides,
    }


def flow_quick_run(output_dir: Path, **overrides) -> dict:
    """quick_run for the flow family (a micro DiT over the block-DCT latents: no tokenizer), clips cut to 1 s."""
    run = quick_run(None, output_dir, model_family="flow", model_size="micro", learning_rate=1e-2)
    del run["tokenizer"]
    return {**run, "max_duration_seconds": 1.0, "synthetic_num_clips": 48, **overrides}


def stable_audio_3_quick_run(source: Path, output_dir: Path, **overrides) -> dict:
    """quick_run for fine-tuning a tiny StableAudio3Pipeline (`tiny_stable_audio_3`; its family comes from its
    class), clips cut to 1 s (10 latent frames of its 4096-sample VAE), no EMA, so runs end where the weights are."""
    run = quick_run(None, output_dir, model_name_or_path=str(source), learning_rate=3e-3, ema=False)
    del run["tokenizer"]
    return {**run, "final_model": "raw", "max_duration_seconds": 1.0, "synthetic_num_clips": 24, **overrides}


def stable_audio_quick_run(source: Path, output_dir: Path, **overrides) -> dict:
    """quick_run for fine-tuning a tiny StableAudioPipeline (`tiny_stable_audio`; its family comes from its class),
    clips cut to 1 s (each then one 32-frame window with its silence), no EMA, so runs end where the weights are."""
    run = quick_run(None, output_dir, model_name_or_path=str(source), learning_rate=3e-3, ema=False)
    del run["tokenizer"]
    return {**run, "final_model": "raw", "max_duration_seconds": 1.0, "synthetic_num_clips": 24, **overrides}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's weights; a diffusers pipeline folder's trained parts (transformer, and projection_model or
    duration_embedder, ACE-Step's condition_encoder: those it has)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return {
            f"{part}.{k}": v
            for part in ("transformer", "projection_model", "duration_embedder", "condition_encoder")
            if (folder / part).is_dir()
            for k, v in load_file(str(folder / part / "diffusion_pytorch_model.safetensors")).items()
        }
    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def as_flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def launch(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` a recipe the way a user would, offline. Past `timeout` seconds the launcher and its
    workers are killed and `subprocess.TimeoutExpired` (with their output) is raised."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    with subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own, and a worker stuck in a collective ignores the
            # SIGTERM it would forward: kill them by pid, or they would hold the pipes open for gloo's 30 minutes
            for worker in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
            process.kill()
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def tiny_codec(folder: Path, num_codebooks: int = 2, codebook_size: int = 64) -> Path:
    """A tiny random EnCodec (16 kHz, 50 frames/s) saved as a model folder, its codebooks drawn from its encoder's
    outputs on synthetic clips (the codec stage's `init_codebooks`): a new EncodecModel's codebooks are all zero, so
    every frame would get code 0; these codes follow the audio."""
    from transformers import EncodecConfig, EncodecModel

    from hf_audio_trainer.codec import CodecGenerator, init_codebooks

    frame_rate = 50
    bandwidth = num_codebooks * math.log2(codebook_size) * frame_rate / 1000  # kbps of `num_codebooks` codebooks
    config = EncodecConfig(
        sampling_rate=16000, audio_channels=1, num_filters=4, hidden_size=16, codebook_size=codebook_size,
        codebook_dim=16, upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[bandwidth], num_lstm_layers=1,
        chunk_length_s=None, normalize=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EncodecModel(config)
    clips = make_synthetic_dataset(num_clips=40, seed=123)["train"]
    audio = torch.stack([torch.tensor(a["array"][:8000], dtype=torch.float32) for a in clips["audio"]])[:, None]
    with torch.no_grad():
        init_codebooks(CodecGenerator(model), audio)
    model.save_pretrained(folder)
    return folder


def tiny_musicgen(folder: Path, codec: Path, decoder_codebooks: int | None = None) -> Path:
    """A tiny random MusicgenForConditionalGeneration (T5 + the codec + a decoder) with its processor (ByT5's
    tokenizer) and generation config, in the layout of facebook/musicgen-small; built with transformers alone."""
    from transformers import (
        ByT5Tokenizer,
        EncodecFeatureExtractor,
        EncodecModel,
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
    )  # fmt: skip

    audio = EncodecModel.from_pretrained(codec)
    k, size = (
        audio.quantizer.get_num_quantizers_for_bandwidth(audio.config.target_bandwidths[0]),
        audio.config.codebook_size,
    )
    text = T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    decoder = MusicgenDecoderConfig(
        vocab_size=size, num_codebooks=decoder_codebooks or k, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, ffn_dim=64, max_position_embeddings=512, pad_token_id=size, bos_token_id=size,
        audio_channels=1,
    )  # fmt: skip
    config = MusicgenConfig(
        text_encoder=text.to_dict(), audio_encoder=audio.config.to_dict(), decoder=decoder.to_dict()
    )
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config)
    model.audio_encoder.load_state_dict(audio.state_dict())
    model.generation_config = GenerationConfig(
        do_sample=True, guidance_scale=3.0, max_length=256, decoder_start_token_id=size, pad_token_id=size,
        bos_token_id=size,
    )  # fmt: skip
    model.save_pretrained(folder)
    MusicgenProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=16000), ByT5Tokenizer()).save_pretrained(
        folder
    )
    return folder


def described_folder(folder: Path, num_clips: int = 12, with_text: bool = True) -> Path:
    """A folder of synthetic wav clips with a metadata.csv (file_name, description), as a user's dataset would be."""
    import soundfile as sf

    train = make_synthetic_dataset(num_clips=num_clips, validation_fraction=0.1, seed=1)["train"]
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,description"] if with_text else ["file_name"]
    for i, (audio, text) in enumerate(zip(train["audio"], train["description"], strict=True)):
        sf.write(folder / f"clip{i}.wav", audio["array"], audio["sampling_rate"])
        rows.append(f'clip{i}.wav,"{text}"' if with_text else f"clip{i}.wav")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def tiny_clap(folder: Path) -> Path:
    """A tiny random ClapModel with its feature extractor (1-s windows at 16 kHz) and a byte-level text tokenizer
    (ByT5's: no vocabulary file), saved as a model folder."""
    from transformers import ByT5Tokenizer, ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(0)
    config = ClapConfig(
        text_config={
            "vocab_size": 384, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 160, "projection_dim": 8, "pad_token_id": 0,
        },
        audio_config={
            "spec_size": 64, "num_mel_bins": 16, "window_size": 4, "depths": [1, 1], "num_attention_heads": [2, 2],
            "patch_embeds_hidden_size": 8, "hidden_size": 16, "projection_dim": 8, "num_hidden_layers": 2,
        },
        projection_dim=8,
    )  # fmt: skip
    extractor = ClapFeatureExtractor(
        feature_size=16, sampling_rate=16000, hop_length=160, fft_window_size=400, max_length_s=1,
        frequency_min=0, frequency_max=8000, truncation="rand_trunc",
    )  # fmt: skip
    ClapModel(config).save_pretrained(folder)
    extractor.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def parquet_shards(folder: Path, train_shards: int = 4, rows_per_shard: int = 16, validation_rows: int = 8) -> Path:
    """Synthetic clips as parquet shards the way `datasets` writes an Audio column ({"bytes", "path"} structs):
    train-0000N-of-0000M.parquet and validation-00000-of-00001.parquet, a streamable dataset folder."""
    import io

    import datasets
    import soundfile as sf

    clips = make_synthetic_dataset(num_clips=train_shards * rows_per_shard + validation_rows + 1, seed=2)["train"]
    folder.mkdir(parents=True, exist_ok=True)

    def encoded(a) -> dict:
        out = io.BytesIO()
        sf.write(out, a["array"], a["sampling_rate"], format="WAV")
        return {"bytes": out.getvalue(), "path": None}

    rows = [{"audio": encoded(a), "description": d} for a, d in zip(clips["audio"], clips["description"], strict=True)]
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": struct, "description": datasets.Value("string")})
    parts = [("train", i, rows[i * rows_per_shard : (i + 1) * rows_per_shard]) for i in range(train_shards)]
    parts.append(("validation", 0, rows[train_shards * rows_per_shard :][:validation_rows]))
    for split, i, part in parts:
        count = train_shards if split == "train" else 1
        # cast on Arrow storage: encoding an Audio value in Python would need torchcodec
        shard = datasets.Dataset.from_list(part, features=features).cast_column("audio", datasets.Audio(decode=False))
        shard.to_parquet(str(folder / f"{split}-{i:05d}-of-{count:05d}.parquet"))
    return folder


# words of the synthetic descriptions, so a tiny tokenizer gives them a few tokens each (letters cover the rest)
DESCRIPTION_WORDS = (
    "a bpm melody of notes in major minor played on triangle wave with light noise arpeggio over chord sawtooth synth "
    "clean sine tone plucked string heavy moderate struck times single note square-wave pentatonic dominant "
    "diminished third 7th clipped bit-crushed"
).split()


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A T5 tokenizer (transformers builds its Unigram model from a vocabulary list: no download, no sentencepiece)
    over the synthetic descriptions' words and single characters."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789#,-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += (
        [(c, -5.0) for c in chars] + [(f"▁{c}", -5.0) for c in chars] + [(f"▁{w}", -1.0) for w in DESCRIPTION_WORDS]
    )
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# Stable Audio Open 1.0's scheduler (its scheduler/scheduler_config.json)
SAO_SCHEDULER = dict(
    sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", prediction_type="v_prediction",
    solver_order=2, solver_type="midpoint", final_sigmas_type="zero", num_train_timesteps=1000, rho=7.0,
)  # fmt: skip


def tiny_stable_audio(folder: Path, sample_size: int = 32, seed: int = 0) -> Path:
    """A tiny random StableAudioPipeline in Stable Audio Open 1.0's layout: its scheduler's config, a stereo 44.1 kHz
    AutoencoderOobleck with its 2048-sample hop (21.5 latent frames/s), a T5 encoder and T5 tokenizer, a DiT of
    `sample_size` frames (1.49 s at 32) and the duration conditioners, saved with diffusers' save_pretrained."""
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.0))  # fmt: skip
    vae = AutoencoderOobleck(
        encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=4, decoder_input_channels=4, audio_channels=2, sampling_rate=44100,
    )  # fmt: skip
    transformer = StableAudioDiTModel(
        sample_size=sample_size, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, num_key_value_attention_heads=1, cross_attention_dim=16, time_proj_dim=16,
        cross_attention_input_dim=16, global_states_input_dim=32,
    )  # fmt: skip
    projection = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=16, min_value=0, max_value=16)
    pipe = StableAudioPipeline(
        vae=vae, text_encoder=text, projection_model=projection, tokenizer=tokenizer, transformer=transformer,
        scheduler=CosineDPMSolverMultistepScheduler(**SAO_SCHEDULER),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]  # as Stable Audio Open's names it
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def tiny_gemma_tokenizer(model_max_length: int = 64):
    """A Gemma tokenizer (BOS first, padding on the left, as T5Gemma's) over single characters: no download, no
    sentencepiece."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789#,-.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("\u2581" + c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, add_bos_token=True)


def tiny_stable_audio_3(folder: Path, seed: int = 0, stochastic: bool = False) -> Path:
    """A tiny random StableAudio3Pipeline in Stable Audio 3's layout (diffusers' tests/pipelines/stable_audio_3
    sizes, the production conventions kept): a stereo 44.1 kHz AutoencoderSAME with its 4096-sample hop (256-sample
    patches, stride 16: 10.8 latent frames/s) whose latents depend on the audio and have unit scale, a T5Gemma
    encoder and a Gemma tokenizer, a DiT with differential attention and memory tokens, the duration embedder, and
    FlowMatchEulerDiscreteScheduler reading t itself (num_train_timesteps 1; `stochastic`: the distilled model's
    ping-pong sampling), saved with diffusers' save_pretrained."""
    from diffusers import AutoencoderSAME, FlowMatchEulerDiscreteScheduler, StableAudio3DiTModel, StableAudio3Pipeline
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
    from transformers import T5GemmaConfig, T5GemmaEncoderModel
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    torch.manual_seed(seed)
    tokenizer = tiny_gemma_tokenizer()
    module = T5GemmaModuleConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=64,
        layer_types=["full_attention"], dropout_rate=0.0, attention_dropout=0.0,
    )  # fmt: skip
    text = T5GemmaEncoderModel(
        T5GemmaConfig(encoder=module.to_dict(), decoder=module.to_dict(), is_encoder_decoder=False)
    )
    vae = AutoencoderSAME(
        audio_channels=2, patch_size=256, encoder_channels=8, encoder_c_mults=(2,), encoder_strides=(16,),
        encoder_transformer_depths=(1,), latent_dim=8, use_differential_attention=False, dim_heads=4, ff_mult=2,
        sampling_rate=44100,
    )  # fmt: skip
    # a new SAME's attention and feed-forward outputs start at zero, so its encoder maps every clip to one latent:
    # draw them, then set the soft-norm bottleneck as training leaves it (latents of zero mean and unit scale per
    # channel), measured on a few 1-s stereo tones and their noisy copies
    t = torch.arange(44100) / 44100
    with torch.no_grad():
        for name, weight in vae.named_parameters():
            if name.endswith(("to_out.weight", "proj_out.weight")) and not weight.any():
                weight.normal_(0, weight.shape[-1] ** -0.5)
        tones = [torch.sin(2 * torch.pi * f * t) for f in (110, 220, 440, 880)]
        tones += [0.5 * torch.sign(x) for x in tones] + [x + 0.3 * torch.randn(len(t)) for x in tones]
        raw = torch.cat([vae.encoder(vae.patch_embed.encode(torch.stack([x, x])[None]))[0] for x in tones], dim=1)
        mean, std = raw.mean(1), raw.std(1)
        vae.bottleneck.scale.copy_((1 / std)[None, :, None])
        vae.bottleneck.bias.copy_((-mean / std)[None, :, None])
    transformer = StableAudio3DiTModel(
        io_channels=8, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=16,
        local_add_cond_dim=9, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
    )  # fmt: skip
    pipe = StableAudio3Pipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, transformer=transformer,
        duration_embedder=StableAudio3DurationEmbedder(output_dim=16, fourier_dim=16),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=stochastic),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder
