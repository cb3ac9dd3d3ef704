"""Where metrics go: accelerate's trackers plus a JSON-lines file every run writes into its output folder."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from hf_audio_trainer.errors import check

logger = logging.getLogger(__name__)

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
        self._torn = False

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the config is saved with every checkpoint and as run_config.json

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        line = (json.dumps(record) + "\n").encode()
        if self._torn:  # the last write stopped mid-line: end that line, or this record would be glued to it
            line = b"\n" + line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one O_APPEND write per record: a full disk or a crash can cut it short (the readers skip such a line), but
        # a record is never split into pieces that a crash could separate
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._torn = True  # until the write has returned whole
            written = os.write(fd, line)
            self._torn = written < len(line)
        finally:
            os.close(fd)
        if self._torn:
            logger.warning(
                "%s: the disk took %d of the %d bytes of step %s's metrics", self.path, written, len(line), step
            )


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl; lines that are not JSON (a write cut short) are skipped with a warning."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records, torn = _parse(path)
    if torn:
        logger.warning("%s: skipped %s; a write cut short by a full disk or a crash", path, _lines(torn))
    return [record for _, record in records]


def truncate_metrics(output_dir: str | os.PathLike, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (and lines that are not JSON), so the file reads like
    one uninterrupted run."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    records, torn = _parse(path)
    if torn:
        logger.warning("%s: dropped %s; a write cut short by a full disk or a crash", path, _lines(torn))
    kept = b"".join(line + b"\n" for line, r in records if isinstance(r.get("step"), int) and r["step"] <= step)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse(path: Path) -> tuple[list[tuple[bytes, dict]], list[int]]:
    # every line that decodes to a record, with its bytes; and the numbers (from 1) of those that do not: half a line,
    # NUL bytes where the file grew but its data never reached the disk, bytes that are not even UTF-8
    records, torn = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            torn.append(number)
    return records, torn


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5])) + (f" ... ({len(numbers)} in all)" if len(numbers) > 5 else "")
    if len(numbers) == 1:
        return f"1 line that is not JSON (line {shown})"
    return f"{len(numbers)} lines that are not JSON (lines {shown})"


def log_audio(accelerator: Accelerator, tag: str, waves: list[np.ndarray], step: int, sample_rate: int) -> None:
    """Clips to TensorBoard's audio tab as `tag/i`, when a TensorBoard tracker is on (other trackers take no audio)."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return
    if hasattr(writer, "add_audio"):
        for i, wave in enumerate(waves):
            writer.add_audio(f"{tag}/{i}", torch.from_numpy(np.clip(wave, -1, 1))[None], step, sample_rate=sample_rate)
