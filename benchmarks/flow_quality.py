"""Does the flow family learn on the embedded default, and do EMA, guidance and Diffusion-DPO do what they should?

Per seed, on the embedded synthetic music with the default flow recipe (`recipes/configs/pretrain_flow.yaml`: tiny
DiT, block-DCT latents, EMA with the power warm-up, FAD of in-loop samples with the mel embedder):

1. pretrain; the fixed-noise validation loss and the FAD of samples, first evaluation vs last, raw and EMA weights;
2. guidance: 16 descriptions of the synthetic generator, each rewritten to say "clean" and "with heavy noise",
   sampled from the same noise at guidance 1 and 3, scored by the spectral flatness of the decoded audio (1: white
   noise, near 0: tones): "heavy noise" should be flatter than "clean", more so at guidance 3;
3. Diffusion-DPO (beta 2000, Tango 2's) from that model on the embedded pairs (clean chosen over a degraded copy):
   held-out implicit reward accuracy at step 0 and at the end, and the scorer (`tonal_clarity`, which the pairs
   encode) of fresh samples from the same noise before and after.

    python benchmarks/flow_quality.py [--seeds 0 1 2] [--max_steps 300] [--align_steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from hf_audio_trainer import align, pretrain
from hf_audio_trainer.alignment import tonal_clarity
from hf_audio_trainer.codecs.latents import load_latent_space
from hf_audio_trainer.config import PretrainConfig, parse_config
from hf_audio_trainer.data.synthetic import make_clip
from hf_audio_trainer.data.text import encode_texts
from hf_audio_trainer.families.flow import load_flow_model, padded_states, sample_latents, text_parts
from hf_audio_trainer.trackers import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPE_YAML = ROOT / "recipes" / "configs" / "pretrain_flow.yaml"
NOISE = re.compile(r", (clean|with (light|moderate|heavy) noise)")


def spectral_flatness(wave: np.ndarray, n_fft: int = 512) -> float:
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-10
    return float(np.mean(np.exp(np.log(power).mean(-1)) / power.mean(-1)))


class Sampler:
    """Samples of a flow run's folder (raw weights) from fixed noise, decoded by its latent space."""

    def __init__(self, folder: Path):
        self.model = load_flow_model(str(folder)).eval()
        self.space = load_latent_space(str(folder), 0, 0, json.loads((folder / "latents.json").read_text()))
        encoder, self.tokenizer = text_parts(None, str(folder))
        self.encoder = encoder
        self.frames = self.model.transformer.config.sample_size

    def __call__(self, prompts: list[str], guidance: float, seed: int, steps: int = 10) -> list[np.ndarray]:
        length = self.tokenizer.model_max_length
        ids = [self.tokenizer(p, truncation=True, max_length=length)["input_ids"] for p in prompts]
        states, mask = padded_states(encode_texts(self.encoder, ids, "cpu"), length)
        noise = torch.randn(
            len(prompts), self.space.channels, self.frames, generator=torch.Generator().manual_seed(seed)
        )
        seconds = self.frames / self.space.frame_rate
        x = sample_latents(self.model, states, mask, seconds, self.frames, self.space.channels, guidance, steps,
                           noise=noise)  # fmt: skip
        return [w.numpy() for w in self.space.decode(x)]


def evals(folder: Path, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in read_metrics(folder) if key in m]


def run_seed(seed: int, args, root: Path) -> dict:
    out = root / f"pretrain-{seed}"
    flags = ["--model_family", "flow", "--seed", str(seed), "--max_steps", str(args.max_steps), "--output_dir",
             str(out), "--eval_steps", str(args.max_steps // 3), "--save_steps", str(args.max_steps),
             "--num_eval_samples", str(args.num_eval_samples)]  # fmt: skip
    if not (out / "model_index.json").is_file():  # a finished run in --out is reused
        pretrain(parse_config(flags, PretrainConfig, str(RECIPE_YAML)))
    loss, loss_ema, fad = evals(out, "eval/loss"), evals(out, "eval/loss_ema"), evals(out, "eval/fad")
    result = {
        "seed": seed,
        "val_loss_first": loss[0][1], "val_loss_last": loss[-1][1],
        "val_loss_drop": 1 - loss[-1][1] / loss[0][1],
        "val_loss_ema_last": loss_ema[-1][1],
        "fad_first": fad[0][1], "fad_last": fad[-1][1],
        "eval_steps": [s for s, _ in loss],
    }  # fmt: skip
    # guidance: the same noise, the description saying clean vs heavy noise
    descriptions = [make_clip(10_000 + i, 16000, 1.0, 2.0, seed).description for i in range(16)]
    clean = [NOISE.sub(", clean", d) for d in descriptions]
    noisy = [NOISE.sub(", with heavy noise", d) for d in descriptions]
    sampler = Sampler(out)
    for g in (1.0, 3.0):
        flat = {name: float(np.mean([spectral_flatness(w) for w in sampler(p, g, seed)]))
                for name, p in (("clean", clean), ("noisy", noisy))}  # fmt: skip
        result[f"flatness_clean_g{g:g}"], result[f"flatness_noisy_g{g:g}"] = flat["clean"], flat["noisy"]
        result[f"flatness_gap_g{g:g}"] = flat["noisy"] - flat["clean"]
    before = [tonal_clarity(w, 16000) for w in sampler(descriptions, 3.0, seed + 1)]
    # Diffusion-DPO from that model
    aligned = root / f"align-{seed}"
    shutil.rmtree(aligned, ignore_errors=True)
    align({
        "model_family": "flow", "model_name_or_path": str(out), "output_dir": str(aligned), "report_to": "none",
        "synthetic_num_pairs": 400, "max_steps": args.align_steps, "eval_steps": args.align_steps,
        "eval_on_start": True, "logging_steps": 10, "save_steps": 10_000, "per_device_train_batch_size": 8,
        "max_duration_seconds": 2.0, "learning_rate": 1e-4, "beta": 2000.0, "seed": seed,
    })  # fmt: skip
    accuracy = evals(aligned, "eval/rewards/accuracies")
    after = [tonal_clarity(w, 16000) for w in Sampler(aligned)(descriptions, 3.0, seed + 1)]
    result.update(
        dpo_accuracy_first=accuracy[0][1], dpo_accuracy_last=accuracy[-1][1],
        tonal_clarity_before=float(np.mean(before)), tonal_clarity_after=float(np.mean(after)),
    )  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--align_steps", type=int, default=40)
    parser.add_argument("--num_eval_samples", type=int, default=64, help="clips per FAD (128-dim mel features)")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.out or tempfile.mkdtemp(prefix="flow-quality-"))
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args, root))
        print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    print(json.dumps({"mean": {k: float(np.mean([r[k] for r in rows])) for k in keys}}, indent=1))


if __name__ == "__main__":
    main()
