"""Where metrics go: accelerate's trackers plus a JSON-lines file every run writes into its output folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from hf_audio_trainer.errors import check

METRICS_FILE = "metrics.jsonl"
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


@dataclass
class LoggingConfig:
    """What is measured and where it goes."""

    logging_steps: int = field(default=10, metadata={"help": "Log train metrics every N optimizer steps."})
    eval_steps: int = field(default=100, metadata={"help": "Validation loss every N steps; 0 disables."})
    eval_on_start: bool = field(default=True, metadata={"help": "Also measure validation loss before step 1."})
    report_to: str = field(default="tensorboard", metadata={"help": "Comma-separated accelerate trackers, or 'none'."})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "One device's peak TFLOP/s for train/mfu; unset: a table of common GPUs."}
    )

    def __post_init__(self) -> None:
        check(self.logging_steps >= 1, f"logging_steps={self.logging_steps}: must be >= 1")
        check(self.eval_steps >= 0, f"eval_steps={self.eval_steps}: must be >= 0 (0 disables)")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops={self.peak_tflops}: must be > 0")
        for name in self.trackers:
            check(name in REPORT_TO, f"report_to: unknown tracker {name!r}; choose from {REPORT_TO} or 'none'")

    @property
    def trackers(self) -> list[str]:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names


class JSONLinesTracker(GeneralTracker):
    """Appends `{"step", "time" (unix seconds), metric: value}` lines to output_dir/metrics.jsonl."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, output_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(output_dir) / METRICS_FILE

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the config is saved with every checkpoint and as run_config.json

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
            f.write(json.dumps(record) + "\n")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All lines of a run's metrics.jsonl."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | os.PathLike, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step, so the file reads like one uninterrupted run."""
    path = Path(output_dir) / METRICS_FILE
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def log_audio(accelerator: Accelerator, tag: str, waves: list[np.ndarray], step: int, sample_rate: int) -> None:
    """Clips to TensorBoard's audio tab as `tag/i`, when a TensorBoard tracker is on (other trackers take no audio)."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return
    if hasattr(writer, "add_audio"):
        for i, wave in enumerate(waves):
            writer.add_audio(f"{tag}/{i}", torch.from_numpy(np.clip(wave, -1, 1))[None], step, sample_rate=sample_rate)
