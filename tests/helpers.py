"""Shared pieces of the end-to-end tests: a small fitted tokenizer and quick run settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def as_flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def launch(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` a recipe the way a user would, offline."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
