"""Does the text-conditioned MusicGen (musicgen_text) use the text? On the embedded synthetic data, per seed:

1. pretrain a tiny model with the default recipe (`--model_family musicgen_text --tokenizer CODEC`);
2. held-out validation loss given each clip's own description, the null condition, and another clip's description
   (the descriptions shuffled among the validation clips);
3. generation: 32 validation descriptions, each rewritten to say "clean" and "with heavy noise", sampled at
   guidance 1 and 3 (same seeds for both), and scored by how noisy their codes are: the mean log-ratio of each code
   under the code histograms of the training clips described as heavily noisy against those described as clean
   (> 0: the codes look like noisy audio). With `--acoustic`, also the spectral flatness of the decoded clips.

    python benchmarks/text_conditioning.py [--codec FOLDER] [--seeds 0 1 2] [--max_steps 300] [--acoustic]

CODEC is an EnCodec folder (e.g. `recipes/codec.py`'s output). The default is a random EnCodec whose codebooks are
drawn from its encoder's outputs (4 x 256): its codes carry the audio's content but its decoder is random, so only
the code-space score means something there. (The tiny codec that `recipes/codec.py` trains in 300 CPU steps
collapses its first codebook to under 1 bit per frame, too little for the text to matter.)
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, MusicgenForConditionalGeneration

from hf_audio_trainer import pretrain
from hf_audio_trainer.codec import CodecGenerator, init_codebooks
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.config import PretrainConfig, parse_config
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.data.text import TextCollator, encode_texts
from hf_audio_trainer.families.musicgen_hub import generate_audio, returning_codes
from hf_audio_trainer.families.musicgen_text import text_lm_loss

RECIPE_YAML = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "pretrain.yaml"
NOISE = re.compile(r", (clean|with (light|moderate|heavy) noise)")


def spectral_flatness(wave: np.ndarray, n_fft: int = 512) -> float:
    """Mean over frames of geometric / arithmetic mean of the power spectrum (1: white noise, near 0: a few tones)."""
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-10
    return float(np.mean(np.exp(np.log(power).mean(-1)) / power.mean(-1)))


@torch.no_grad()
def validation_losses(model, processor, clips) -> dict[str, float]:
    """Per-token loss of the validation codes given the true, the null and shuffled descriptions."""
    codec = EncodecTokenizer(model.audio_encoder)
    waves = [np.asarray(a["array"], dtype=np.float32) for a in clips["audio"]]  # 16 kHz, the codec's rate
    codes = [c.numpy() for c in codec.encode_batch(waves)]
    ids = [processor.tokenizer(t)["input_ids"] for t in clips["description"]]
    states = encode_texts(model.text_encoder, ids, "cpu")
    k, pad = model.config.decoder.num_codebooks, model.config.decoder.pad_token_id
    base = CodesCollator(k, pad, pad, codec.frame_rate)
    shuffled = np.random.default_rng(0).permutation(len(states))
    results = {}
    for name, order, null in (("true", range(len(states)), False), ("null", range(len(states)), True),
                              ("shuffled", shuffled, False)):  # fmt: skip
        collate = TextCollator(base, cached=True, null=null)
        total = count = 0.0
        for start in range(0, len(codes), 16):
            rows = [
                {"codes": codes[i], "text_states": states[order[i]]} for i in range(start, min(start + 16, len(codes)))
            ]
            batch = collate(rows)
            loss, _ = text_lm_loss(model, batch)
            total, count = total + loss.item(), count + batch["num_items"]
        results[name] = total / count
    return results


def data_codec(folder: Path, seed: int = 0) -> Path:
    """A random EnCodec (16 kHz, 50 frames/s, 4 x 256) whose codebooks are drawn from its encoder's outputs on
    synthetic clips (the codec stage's `init_codebooks`), so its codes follow the audio; a new one's are all zero,
    and random-normal ones collapse onto one entry."""
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(
        sampling_rate=16000, audio_channels=1, num_filters=8, hidden_size=32, codebook_size=256, codebook_dim=32,
        upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[1.6], num_lstm_layers=1, chunk_length_s=None,
        normalize=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = EncodecModel(config).eval()
    clips = make_synthetic_dataset(num_clips=200, seed=10_000 + seed)["train"]  # not the benchmark's clips
    audio = torch.stack([torch.tensor(a["array"][:8000], dtype=torch.float32) for a in clips["audio"]])[:, None]
    with torch.no_grad():
        init_codebooks(CodecGenerator(model), audio, seed=seed)
    model.save_pretrained(folder)
    return folder


def noise_scorer(codec: EncodecTokenizer, train) -> callable:
    """score(codes [K, T]) -> mean log p_noisy(code) / p_clean(code), from the training clips' code histograms."""
    k = codec.num_codebooks
    hist = {c: np.ones((k, codec.codebook_size)) for c in ("noisy", "clean")}  # add-one smoothing
    for audio, text in zip(train["audio"], train["description"], strict=True):
        kind = "noisy" if "heavy noise" in text else "clean" if text.endswith("clean") else None
        if kind is not None:
            codes = codec.encode(np.asarray(audio["array"], dtype=np.float32)).numpy()
            for j in range(k):
                hist[kind][j] += np.bincount(codes[j], minlength=codec.codebook_size)
    log_ratio = np.log(hist["noisy"] / hist["noisy"].sum(1, keepdims=True)) - np.log(
        hist["clean"] / hist["clean"].sum(1, keepdims=True)
    )
    return lambda codes: float(np.mean([log_ratio[j, codes[j]].mean() for j in range(k)]))


def generate_codes(model, texts, processor, num_frames: int, guidance_scale: float) -> list[np.ndarray]:
    """Like generate_audio, but the codes the model sampled."""
    with returning_codes(model):
        codes = generate_audio(model, texts, processor, num_frames, guidance_scale)
    return [c.astype(np.int64) for c in codes]


def by_prompt(model, processor, descriptions, guidance, seed, measure, generate) -> dict[str, list]:
    out = {}
    for phrase in ("clean", "with heavy noise"):
        texts = [NOISE.sub("", d) + f", {phrase}" for d in descriptions]
        torch.manual_seed(seed)
        out[phrase] = [measure(x) for x in generate(model, texts, processor, 100, guidance)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default=None)
    parser.add_argument("--acoustic", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--output", default="outputs/benchmarks/text_conditioning.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = []
    keep = tempfile.TemporaryDirectory()
    codec_path = args.codec or str(data_codec(Path(keep.name) / "codec"))
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            flags = {
                "model_family": "musicgen_text", "tokenizer": codec_path, "output_dir": tmp, "seed": seed,
                "max_steps": args.max_steps, "report_to": "none", "eval_steps": args.max_steps, "save_steps": 10**6,
            }  # fmt: skip
            # what `recipes/pretrain.py --flag value ...` runs: the recipe's YAML, then the flags
            argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
            pretrain(parse_config(argv, PretrainConfig, str(RECIPE_YAML)))
            model = MusicgenForConditionalGeneration.from_pretrained(tmp).eval()
            processor = AutoProcessor.from_pretrained(tmp)
        splits = make_synthetic_dataset(num_clips=2000, validation_fraction=0.05, seed=seed)
        clips = splits["validation"]
        losses = validation_losses(model, processor, clips)
        prompts = clips["description"][:32]
        score = noise_scorer(EncodecTokenizer(model.audio_encoder), splits["train"].select(range(600)))
        measures = {"code_noisiness": (score, generate_codes)}
        if args.acoustic:
            measures["flatness"] = (spectral_flatness, generate_audio)
        row = {"seed": seed, "loss": losses}
        for guidance in (1.0, 3.0):
            for name, (measure, generate) in measures.items():
                values = by_prompt(model, processor, prompts, guidance, seed, measure, generate)
                diff = np.asarray(values["with heavy noise"]) - np.asarray(values["clean"])
                row[f"{name}_guidance_{guidance:g}"] = {
                    "clean": float(np.mean(values["clean"])), "noisy": float(np.mean(values["with heavy noise"])),
                    "noisy_minus_clean": float(diff.mean()), "fraction_right_way": float((diff > 0).mean()),
                }  # fmt: skip
        print(json.dumps(row), flush=True)
        report.append(row)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
