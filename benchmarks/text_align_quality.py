"""Does aligning the text-conditioned MusicGen on text-prompted pairs move its own generations? Per seed:

1. pretrain a tiny musicgen_text model with the default recipe (over the random, data-initialised EnCodec of
   `text_conditioning.py`);
2. align it with the default align recipe on the embedded text-prompted pairs (each clean clip's description as the
   prompt, the clip chosen over a degraded copy: noise, detune or clipping);
3. held-out reward accuracy at step 0 and at the end (from the run's metrics), and the "degradedness" of fresh
   generations from 32 validation descriptions before and after, same prompts and seeds: the mean log-ratio of their
   codes under the code histograms of the rejected (degraded) against the chosen (clean) training audio
   (lower: the generations look more like the chosen side).

    python benchmarks/text_align_quality.py [--seeds 0 1 2] [--pretrain_steps 300] [--align_steps 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, MusicgenForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_conditioning import data_codec  # noqa: E402  (a sibling script, not a package)

from hf_audio_trainer import align, pretrain  # noqa: E402
from hf_audio_trainer.codecs import EncodecTokenizer  # noqa: E402
from hf_audio_trainer.config import AlignConfig, PretrainConfig, parse_config  # noqa: E402
from hf_audio_trainer.data.preferences import make_synthetic_preferences  # noqa: E402
from hf_audio_trainer.data.synthetic import make_synthetic_dataset  # noqa: E402
from hf_audio_trainer.families.musicgen_hub import generate_audio, returning_codes  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def run(stage, config_cls, yaml: str, flags: dict):
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    return stage(parse_config(argv, config_cls, str(CONFIGS / yaml)))


def degradedness_scorer(codec: EncodecTokenizer, pairs) -> callable:
    """score(codes [K, T]) -> mean log p_rejected(code) / p_chosen(code), from the pairs' code histograms."""
    k = codec.num_codebooks
    hist = {side: np.ones((k, codec.codebook_size)) for side in ("chosen", "rejected")}
    for side in hist:
        for audio in pairs[side]:
            codes = codec.encode(np.asarray(audio["array"], dtype=np.float32)).numpy()
            for j in range(k):
                hist[side][j] += np.bincount(codes[j], minlength=codec.codebook_size)
    log_ratio = np.log(hist["rejected"] / hist["rejected"].sum(1, keepdims=True)) - np.log(
        hist["chosen"] / hist["chosen"].sum(1, keepdims=True)
    )
    return lambda codes: float(np.mean([log_ratio[j, codes[j]].mean() for j in range(k)]))


def generation_scores(folder: str, prompts: list[str], score, seed: int) -> np.ndarray:
    model = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    torch.manual_seed(seed)
    with returning_codes(model):
        codes = generate_audio(model, prompts, processor, num_frames=100, guidance_scale=3.0)
    return np.asarray([score(c.astype(np.int64)) for c in codes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--align_steps", type=int, default=100)
    parser.add_argument("--output", default="outputs/benchmarks/text_align_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        codec_path = str(data_codec(Path(tmp) / "codec"))
        for seed in args.seeds:
            base, aligned = f"{tmp}/pretrain-{seed}", f"{tmp}/align-{seed}"
            common = {"report_to": "none", "seed": seed, "save_steps": 10**6}
            run(pretrain, PretrainConfig, "pretrain.yaml", {
                "model_family": "musicgen_text", "tokenizer": codec_path, "output_dir": base,
                "max_steps": args.pretrain_steps, "eval_steps": args.pretrain_steps, **common,
            })  # fmt: skip
            run(align, AlignConfig, "align.yaml", {
                "model_family": "musicgen_text", "model_name_or_path": base, "output_dir": aligned,
                "max_steps": args.align_steps, "eval_steps": args.align_steps, "eval_on_start": True, **common,
            })  # fmt: skip
            evals = [json.loads(x) for x in Path(aligned, "metrics.jsonl").read_text().splitlines()]
            accuracy = [(m["step"], m["eval/rewards/accuracies"]) for m in evals if "eval/rewards/accuracies" in m]
            model = MusicgenForConditionalGeneration.from_pretrained(base)
            pairs = make_synthetic_preferences(400, seed)["train"].select(range(150))
            score = degradedness_scorer(EncodecTokenizer(model.audio_encoder), pairs)
            prompts = make_synthetic_dataset(num_clips=2000, validation_fraction=0.05, seed=seed)["validation"][
                "description"
            ][:32]
            before = generation_scores(base, prompts, score, seed)
            after = generation_scores(aligned, prompts, score, seed)
            row = {
                "seed": seed, "held_out_accuracy": accuracy,
                "degradedness_before": float(before.mean()), "degradedness_after": float(after.mean()),
                "fraction_of_prompts_cleaner": float((after < before).mean()),
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            report.append(row)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
