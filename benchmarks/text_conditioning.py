"""Does the text-conditioned MusicGen (musicgen_text) use the text? On the embedded synthetic data, per seed:

1. pretrain a tiny model with the default recipe (`--model_family musicgen_text --tokenizer CODEC`);
2. held-out validation loss given each clip's own description, the null condition, and another clip's description
   (the descriptions shuffled among the validation clips);
3. generation: 32 validation descriptions, each rewritten to say "clean" and "with heavy noise"; the spectral
   flatness of clips generated from each (noise is flat, tones are not) at guidance 1 and 3, same seeds for both.

    python benchmarks/text_conditioning.py --codec outputs/codec [--seeds 0 1 2] [--max_steps 300]

CODEC is an EnCodec folder, e.g. the output of `accelerate launch recipes/codec.py` (trained on the same data).
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
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.config import PretrainConfig, parse_config
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.families.musicgen_text import (
    TextCodesCollator,
    encode_texts,
    generate_audio,
    text_lm_loss,
)

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
        collate = TextCodesCollator(base, cached=True, null=null)
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


def flatness_by_prompt(model, processor, descriptions: list[str], guidance: float, seed: int) -> dict[str, list]:
    out = {}
    for phrase in ("clean", "with heavy noise"):
        texts = [NOISE.sub("", d) + f", {phrase}" for d in descriptions]
        torch.manual_seed(seed)
        waves = generate_audio(model, texts, processor, num_frames=100, guidance_scale=guidance)
        out[phrase] = [spectral_flatness(w) for w in waves]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--output", default="outputs/benchmarks/text_conditioning.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            flags = {
                "model_family": "musicgen_text", "tokenizer": args.codec, "output_dir": tmp, "seed": seed,
                "max_steps": args.max_steps, "report_to": "none", "eval_steps": args.max_steps, "save_steps": 10**6,
            }  # fmt: skip
            # what `recipes/pretrain.py --flag value ...` runs: the recipe's YAML, then the flags
            argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
            pretrain(parse_config(argv, PretrainConfig, str(RECIPE_YAML)))
            model = MusicgenForConditionalGeneration.from_pretrained(tmp).eval()
            processor = AutoProcessor.from_pretrained(tmp)
        clips = make_synthetic_dataset(num_clips=2000, validation_fraction=0.05, seed=seed)["validation"]
        losses = validation_losses(model, processor, clips)
        prompts = clips["description"][:32]
        row = {"seed": seed, "loss": losses}
        for guidance in (1.0, 3.0):
            flat = flatness_by_prompt(model, processor, prompts, guidance, seed)
            diff = np.asarray(flat["with heavy noise"]) - np.asarray(flat["clean"])
            row[f"guidance_{guidance:g}"] = {
                "flatness_clean": float(np.mean(flat["clean"])),
                "flatness_noisy": float(np.mean(flat["with heavy noise"])),
                "noisy_minus_clean": float(diff.mean()), "fraction_right_way": float((diff > 0).mean()),
            }  # fmt: skip
        print(json.dumps(row), flush=True)
        report.append(row)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
