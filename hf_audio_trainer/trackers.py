"""Where metrics go: accelerate's trackers plus a JSON-lines file every run writes into its output folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.jsonl"


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
