"""The CUDA paths in one go, for the day a GPU is at hand (under 8 minutes on one H200).

    python benchmarks/gpu_check.py [--output_dir outputs/gpu_check] [--steps 200]

Runs the real recipe (`accelerate launch recipes/pretrain.py`) on the GPU:
  1-3. the default pretrain for --steps steps in fp32, bf16 and fp16 (fp16 logs its loss scale): the curves must stay
       close to fp32's;
  4.   the `small` model in bf16: tokens/s and MFU;
  5.   FSDP2 on one GPU (accelerate_configs/fsdp2.yaml, one process);
  6.   the flow family's `small` DiT (~100M parameters) in bf16: samples/s and MFU;
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
    """(name, accelerate launch options, recipe flags) of every run; the first fits the tokenizer the others reuse."""
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
    ]


def command(name: str, launcher: list[str], flags: list[str], output_dir: Path) -> list[str]:
    folder = output_dir / name.replace(" ", "_")
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "recipes/pretrain.py", *flags,
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
    parser.add_argument("--timeout", type=int, default=150, help="Seconds each run may take.")
    args = parser.parse_args()
    runs = plan(args.output_dir, args.steps)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing run. On a GPU this script runs, from the repository root:")
        for name, launcher, flags in runs:
            print(f"  [{name}] accelerate launch " + " ".join(command(name, launcher, flags, args.output_dir)[3:]))
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
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
