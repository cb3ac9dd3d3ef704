"""The CUDA paths in one go, for the day a GPU is at hand (about 12 minutes on one H200).

    python benchmarks/gpu_check.py [--output_dir outputs/gpu_check] [--steps 200]

Runs the real recipes (`accelerate launch recipes/pretrain.py`, `recipes/finetune.py`) on the GPU:
  1-3. the default pretrain for --steps steps in fp32, bf16 and fp16 (fp16 logs its loss scale): the curves must stay
       close to fp32's;
  4.   the `small` model in bf16: tokens/s and MFU;
  5.   FSDP2 on one GPU (accelerate_configs/fsdp2.yaml, one process);
  6.   the flow family's `small` DiT (~100M parameters) in bf16: samples/s and MFU;
  7-8. the stable_audio family fine-tuning a Stable-Audio-Open-sized pipeline (the `medium` DiT: 24 layers, 1.06B
       parameters, 1024-frame windows; T5-base and the stereo 44.1 kHz VAE's shapes) in bf16, with LoRA and in full:
       samples/s, MFU and peak memory (stable-audio-tools users report 27-30 GB for the full one). Its weights are
       random (no download: OUTPUT_DIR/sao_shaped is built first), which changes nothing of speed or memory;
and reads nvidia-ml-py's utilisation and memory from each run's metrics. Prints a table (also written to
OUTPUT_DIR/gpu_check.md) and exits 1 if a run failed or a check missed. Without a CUDA device it prints what it would
run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CURVE_TOLERANCE = 0.05  # a low-precision train/loss curve may differ from fp32's by 5% of its value at any step


def plan(output_dir: Path, steps: int) -> list[tuple[str, list[str], list[str]]]:
    """(name, accelerate launch options, recipe flags) of every run; the first fits the tokenizer the others reuse.
    A run with --model_name_or_path fine-tunes (recipes/finetune.py), the others pretrain."""
    tokenizer = ["--tokenizer", str(output_dir / "fp32" / "tokenizer")]
    common = ["--max_steps", str(steps), "--eval_steps", str(steps // 2), "--save_steps", str(steps),
              "--logging_steps", "10", "--report_to", "none", "--overwrite_output_dir", "true"]  # fmt: skip
    one_gpu = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    return [
        ("fp32", one_gpu, [*common, "--mixed_precision", "no"]),
        ("bf16", one_gpu, [*common, "--mixed_precision", "bf16", *tokenizer]),
        ("fp16", one_gpu, [*common, "--mixed_precision", "fp16", *tokenizer]),
        (
            "small bf16",
            one_gpu,
            [
                *common[:1],
                "60",
                *common[2:],
                "--model_size",
                "small",
                "--mixed_precision",
                "bf16",
                "--per_device_train_batch_size",
                "32",
                *tokenizer,
            ],
        ),  # fmt: skip
        (
            "fsdp2 1 gpu",
            ["--config_file", "accelerate_configs/fsdp2.yaml", "--num_processes", "1"],
            [*common[:1], "50", *common[2:], "--mixed_precision", "bf16", *tokenizer],
        ),  # fmt: skip
        (  # the flow family's ~100M-parameter DiT (recipes/configs/pretrain_flow.yaml): samples/s and MFU
            "flow small bf16",
            one_gpu,
            [
                "--model_family",
                "flow",
                *common[:1],
                "60",
                *common[2:],
                "--model_size",
                "small",
                "--mixed_precision",
                "bf16",
                "--per_device_train_batch_size",
                "32",
                "--segment_seconds",
                "4.0",
            ],
        ),  # fmt: skip
        *(  # Stable Audio Open's size: a few clips (each a whole 47.55 s window), no checkpoint, the recipe's EMA
            (
                f"sao {kind} bf16",
                one_gpu,
                [
                    "--model_name_or_path",
                    str(output_dir / SAO_SHAPED),
                    *common[:1],
                    "40",
                    "--eval_steps",
                    "40",
                    "--save_steps",
                    "1000",
                    *common[6:],
                    "--mixed_precision",
                    "bf16",
                    "--per_device_train_batch_size",
                    "4",
                    "--synthetic_num_clips",
                    "64",
                    *extra,
                ],
            )  # fmt: skip
            for kind, extra in (("lora", ["--use_peft", "true"]), ("full", []))
        ),
    ]


SAO_SHAPED = "sao_shaped"


def sao_shaped_pipeline(folder: Path) -> Path:
    """A StableAudioPipeline with Stable Audio Open 1.0's configs (DiT, conditioners, T5-base encoder, VAE,
    scheduler) and random weights, built with diffusers and transformers alone (nothing downloaded); once."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )  # fmt: skip
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789#,-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=128)  # a T5 tokenizer without sentencepiece
    text_encoder = T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                           num_heads=12))  # fmt: skip  # t5-base's encoder
    vae = AutoencoderOobleck(
        encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 2, 4, 8, 16],
        decoder_channels=128, decoder_input_channels=64, audio_channels=2, sampling_rate=44100,
    )  # fmt: skip
    transformer = StableAudioDiTModel(
        sample_size=1024, in_channels=64, out_channels=64, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, num_key_value_attention_heads=12, cross_attention_dim=768, time_proj_dim=256,
        cross_attention_input_dim=768, global_states_input_dim=1536,
    )  # fmt: skip
    projection = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512)
    scheduler = CosineDPMSolverMultistepScheduler(
        sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", prediction_type="v_prediction"
    )
    StableAudioPipeline(
        vae=vae, text_encoder=text_encoder, projection_model=projection, tokenizer=tokenizer,
        transformer=transformer, scheduler=scheduler,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def command(name: str, launcher: list[str], flags: list[str], output_dir: Path) -> list[str]:
    folder = output_dir / name.replace(" ", "_")
    recipe = "recipes/finetune.py" if "--model_name_or_path" in flags else "recipes/pretrain.py"
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, recipe, *flags,
            "--output_dir", str(folder)]  # fmt: skip


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summarize(rows: list[dict], reference: list[dict] | None = None) -> dict[str, float | None]:
    """One run's figures: final losses, throughput, MFU, loss scale, GPU use, and the largest relative gap of its
    train/loss curve to the reference run's at the same steps."""
    train = {m["step"]: m for m in rows if "train/loss" in m}
    evals = [m["eval/loss"] for m in rows if "eval/loss" in m]
    last = train[max(train)] if train else {}
    speed = [m["train/tokens_per_second"] for s, m in sorted(train.items()) if s > 10]  # after the first window
    samples = [
        m["train/samples_per_second"] for s, m in sorted(train.items()) if s > 10 and "train/samples_per_second" in m
    ]
    gap = None
    if reference is not None:
        ref = {m["step"]: m["train/loss"] for m in reference if "train/loss" in m}
        shared = [s for s in train if s in ref]
        gap = max((abs(train[s]["train/loss"] - ref[s]) / abs(ref[s]) for s in shared), default=None)
    return {
        "train/loss": last.get("train/loss"),
        "eval/loss": evals[-1] if evals else None,
        "curve gap to fp32": gap,
        "tokens/s": sum(speed) / len(speed) if speed else None,
        "samples/s": sum(samples) / len(samples) if samples else None,
        "mfu": last.get("train/mfu"),
        "loss scale": last.get("train/loss_scale"),
        "gpu util %": max(
            (m["system/gpu_utilization"] for m in train.values() if "system/gpu_utilization" in m), default=None
        ),  # fmt: skip
        "gpu mem GB": max(
            (m["system/gpu_memory_used_gb"] for m in train.values() if "system/gpu_memory_used_gb" in m), default=None
        ),  # fmt: skip
        "peak alloc GB": last.get("system/max_memory_allocated_gb"),
    }


def checks(results: dict[str, dict]) -> dict[str, bool]:
    """What the GPU runs must show."""

    def at_least(value, floor) -> bool:
        return value is not None and value >= floor

    gaps = [results[n]["curve gap to fp32"] for n in ("bf16", "fp16")]
    ran = [r for r in results.values() if r["status"] == "ok"]
    return {
        "every run finished": len(ran) == len(results),
        "bf16 and fp16 train/loss within 5% of fp32 at every logged step": all(
            g is not None and g <= CURVE_TOLERANCE for g in gaps
        ),
        "fp16 logs its loss scale": results["fp16"]["loss scale"] is not None,
        "MFU of the small model logged": results["small bf16"]["mfu"] is not None,
        "MFU of the flow DiT logged": results.get("flow small bf16", {"mfu": None})["mfu"] is not None,
        "Stable-Audio-Open-sized LoRA and full fine-tunes log MFU and peak memory": all(
            results.get(f"sao {kind} bf16", {}).get(key) is not None
            for kind in ("lora", "full")
            for key in ("mfu", "peak alloc GB")
        ),  # fmt: skip
        "nvidia-ml-py utilisation and memory in the metrics": bool(ran)
        and all(at_least(r["gpu util %"], 0) and at_least(r["gpu mem GB"], 1e-3) for r in ran),
    }


def table(results: dict[str, dict]) -> str:
    names = list(next(iter(results.values())).keys())
    lines = ["| run | status | seconds | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for run, r in results.items():
        cells = [f"{r[n]:.4g}" if isinstance(r.get(n), float) else str(r.get(n, "")) for n in names]
        lines.append(f"| {run} | {r['status']} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/gpu_check"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timeout", type=int, default=240, help="Seconds each run may take.")
    args = parser.parse_args()
    runs = plan(args.output_dir, args.steps)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing run. On a GPU this script runs, from the repository root:")
        print(f"  [build] a Stable-Audio-Open-shaped pipeline with random weights in {args.output_dir / SAO_SHAPED}")
        for name, launcher, flags in runs:
            print(f"  [{name}] accelerate launch " + " ".join(command(name, launcher, flags, args.output_dir)[3:]))
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sao_shaped_pipeline(args.output_dir / SAO_SHAPED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results, failed = {}, []
    for name, launcher, flags in runs:
        cmd = command(name, launcher, flags, args.output_dir)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired as err:
            done, status = err, "timeout"
        seconds = time.perf_counter() - start
        if status != "ok":
            failed.append(name)
            print(f"[{name}] {status}:\n{(done.stderr or '')[-3000:] if isinstance(done.stderr, str) else ''}")
        reference = read_metrics(args.output_dir / "fp32") if name in ("bf16", "fp16") else None
        results[name] = {"status": status, "seconds": seconds,
                         **summarize(read_metrics(Path(cmd[-1])), reference)}  # fmt: skip
        print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    report = (
        table(results) + "\n\n" + "\n".join(f"- {'ok  ' if ok else 'MISS'} {c}" for c, ok in checks(results).items())
    )
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu_check.md").write_text(report + "\n")
    return 1 if failed or not all(checks(results).values()) else 0


if __name__ == "__main__":
    sys.exit(main())
