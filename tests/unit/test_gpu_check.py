"""benchmarks/gpu_check.py: on a machine without CUDA it says what it would run; its summary and checks are right."""

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_without_cuda_it_prints_the_plan_and_exits_0(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("no CUDA device here: nothing run")
    runs = [line for line in lines[1:] if "recipes/pretrain.py" in line or "recipes/finetune.py" in line]
    assert [line.split("]")[0].strip(" [") for line in runs] == [
        "fp32",
        "bf16",
        "fp16",
        "small bf16",
        "fsdp2 1 gpu",
        "flow small bf16",
        "sao lora bf16",
        "sao full bf16",
    ]
    assert "--mixed_precision fp16" in runs[2] and "--model_size small" in runs[3]
    assert "--config_file accelerate_configs/fsdp2.yaml --num_processes 1" in runs[4]
    # Stable Audio Open's size fine-tuned from the pipeline the script builds first (its family from its class)
    shaped = str(tmp_path / "sao_shaped")
    assert f"[build] a Stable-Audio-Open-shaped pipeline with random weights in {shaped}" in lines[1]
    for line, lora in zip(runs[6:], (True, False), strict=True):
        assert f"recipes/finetune.py --model_name_or_path {shaped}" in line and "--mixed_precision bf16" in line
        assert ("--use_peft true" in line) == lora and "--model_family" not in line
    assert not any(tmp_path.iterdir())  # nothing ran


def test_the_summary_compares_curves_to_fp32_relative_to_their_size():
    reference = [{"step": 10, "train/loss": 4.0}, {"step": 20, "train/loss": 2.0}, {"step": 20, "eval/loss": 2.5}]
    rows = [
        {"step": 10, "train/loss": 4.2, "train/tokens_per_second": 50.0, "system/gpu_utilization": 80.0},
        {"step": 20, "train/loss": 2.05, "train/tokens_per_second": 100.0, "system/gpu_utilization": 0.0,
         "system/gpu_memory_used_gb": 3.0, "train/loss_scale": 65536.0},
        {"step": 20, "eval/loss": 2.4},
    ]  # fmt: skip
    summary = gpu_check.summarize(rows, reference)
    assert summary["curve gap to fp32"] == pytest.approx(0.05)  # |4.2 - 4| / 4 beats |2.05 - 2| / 2 = 0.025
    assert summary["eval/loss"] == 2.4 and summary["train/loss"] == 2.05
    assert summary["tokens/s"] == 100.0  # the first window (compile, warm-up) is left out
    assert summary["gpu util %"] == 80.0 and summary["gpu mem GB"] == 3.0 and summary["loss scale"] == 65536.0
    assert gpu_check.summarize(rows)["curve gap to fp32"] is None


def test_the_checks_miss_a_curve_that_drifts_and_count_a_zero_as_a_value():
    ok = {"status": "ok", "seconds": 1.0, "curve gap to fp32": 0.0, "loss scale": 1.0, "mfu": 0.0,
          "gpu util %": 0.0, "gpu mem GB": 1.0}  # fmt: skip
    names = ("fp32", "bf16", "fp16", "small bf16", "fsdp2 1 gpu", "flow small bf16", "sao lora bf16", "sao full bf16")
    results = {name: {**ok, "peak alloc GB": 1.0} for name in names}
    assert all(gpu_check.checks(results).values())
    results["sao full bf16"]["peak alloc GB"] = None
    assert not gpu_check.checks(results)["Stable-Audio-Open-sized LoRA and full fine-tunes log MFU and peak memory"]
    results["sao full bf16"]["peak alloc GB"] = 1.0
    results["fp16"]["curve gap to fp32"] = 0.06
    results["fsdp2 1 gpu"]["status"] = "timeout"
    missed = [name for name, ok in gpu_check.checks(results).items() if not ok]
    assert missed == ["every run finished", "bf16 and fp16 train/loss within 5% of fp32 at every logged step"]
    assert "| fp16 | ok | 1 |" in gpu_check.table(results)
