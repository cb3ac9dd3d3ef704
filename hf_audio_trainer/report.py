"""Plots and a markdown summary of a finished (or running) training run, from its metrics.jsonl.

    python -m hf_audio_trainer.report OUTPUT_DIR [--out REPORT_DIR]

`panels()` decides what is drawn (pure data, tested); `draw()` only turns one panel into a matplotlib Figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hf_audio_trainer.trackers import METRICS_FILE, read_metrics

RUN_CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "summary.md"
# Every PNG is FIG_WIDTH x (FIG_MARGIN + SUBPLOT_HEIGHT * number of subplots) inches at DPI.
DPI = 100
FIG_WIDTH = 8.0
FIG_MARGIN = 1.0
SUBPLOT_HEIGHT = 3.0

LOSS_KEYS = ("train/loss", "eval/loss", "eval/loss_ema")
THROUGHPUT = {
    "train/samples_per_second": "samples / s",
    "train/tokens_per_second": "tokens / s",
    "train/audio_seconds_per_second": "audio seconds / s",
}
SETTINGS = (
    "model_name_or_path",
    "model_size",
    "optim",
    "learning_rate",
    "lr_scheduler_type",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "mixed_precision",
)


@dataclass
class Series:
    """One line: a metric's values at the steps where it was logged."""

    key: str
    steps: list[int]
    values: list[float]


@dataclass
class Subplot:
    """One set of axes in a panel."""

    ylabel: str
    series: list[Series]
    log_y: bool = False
    from_zero: bool = False  # rates: an axis cut at 8 samples/s makes a 10% dip look like a collapse


@dataclass
class Panel:
    """One PNG: a title and one or more subplots stacked on a shared step axis."""

    title: str
    subplots: list[Subplot] = field(default_factory=list)


def series(records: list[dict], key: str) -> Series:
    """The numeric values of `key` and their steps; lines without it (or without a step) are skipped."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if r.get("step") is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(float(v))
    return Series(key, steps, values)


def _spans_decades(lines: list[Series]) -> bool:
    # log scale only pays off when values cover orders of magnitude (a loss from 8 to 0.1, grad-norm spikes)
    values = [v for s in lines for v in s.values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 30


def panels(records: list[dict]) -> dict[str, Panel]:
    """What to draw, by PNG name (without .png): only metrics present in `records`, fixed panels first."""
    keys = sorted({k for r in records for k in r if k.startswith(("train/", "eval/", "system/"))})
    present = {k: s for k in keys if (s := series(records, k)).steps}
    out: dict[str, Panel] = {}

    def take(names) -> list[Series]:
        return [present.pop(k) for k in names if k in present]

    if loss := take(LOSS_KEYS):
        out["loss"] = Panel("loss", [Subplot("loss", loss, _spans_decades(loss))])
    if lr := take(["train/learning_rate"]):
        out["learning_rate"] = Panel("learning rate", [Subplot("learning rate", lr)])
    if grad := take(["train/grad_norm"]):
        out["grad_norm"] = Panel("gradient norm (before clipping)", [Subplot("grad norm", grad, _spans_decades(grad))])
    # one subplot each: tokens/s is ~1000x samples/s, they cannot share an axis
    throughput = [Subplot(THROUGHPUT[s.key], [s], from_zero=True) for s in take(THROUGHPUT)]
    if throughput:
        out["throughput"] = Panel("throughput", throughput)
    fad_keys = [k for k in present if k == "eval/fad" or (k.startswith("eval/fad_") and not k.endswith("_num_samples"))]
    if fad := take(fad_keys):  # the sample count is not a distance: it goes with the other metrics
        out["fad"] = Panel("Frechet audio distance", [Subplot("FAD", fad)])
    # memory in GB, utilisation in %: one subplot each
    if system := take([k for k in present if k.startswith("system/")]):
        out["system"] = Panel("system", [Subplot(s.key.removeprefix("system/"), [s]) for s in system])

    # Everything else, grouped by the name after train/ or eval/: train/rewards/margins and eval/rewards/margins
    # share the "rewards" PNG and, with eval/rewards/margins_ema, the "rewards/margins" subplot.
    groups: dict[str, dict[str, list[Series]]] = {}
    # train, then eval, then eval EMA: the same colours as in the loss panel
    for key, s in sorted(present.items(), key=lambda kv: (kv[0].startswith("eval/"), kv[0].endswith("_ema"), kv[0])):
        name = key.split("/", 1)[1]
        group = name.split("/", 1)[0]
        groups.setdefault(group, {}).setdefault(name.removesuffix("_ema"), []).append(s)
    for group, subplots in sorted(groups.items()):
        png = "other_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", group)
        out[png] = Panel(group, [Subplot(name, lines) for name, lines in sorted(subplots.items())])
    return out


def draw(panel: Panel, run_name: str = "") -> Figure:
    """One Figure for `panel`, FIG_WIDTH wide and SUBPLOT_HEIGHT per subplot, sharing the step axis."""
    n = len(panel.subplots)
    fig = Figure(figsize=(FIG_WIDTH, FIG_MARGIN + SUBPLOT_HEIGHT * n), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, sub in zip(axes, panel.subplots, strict=True):
        for s in sub.series:
            # evals are sparse: mark the points so a single eval still shows
            marker = "o" if s.key.startswith("eval/") or len(s.steps) < 3 else None
            ax.plot(s.steps, s.values, label=s.key, marker=marker, markersize=3, linewidth=1.2)
        if sub.log_y:
            ax.set_yscale("log")
        if sub.from_zero:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(sub.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    fig.suptitle(f"{run_name}: {panel.title}" if run_name else panel.title)
    return fig


def _fmt(value: float) -> str:
    # 4 significant digits, but 14013 rather than 1.401e+04 for token rates
    return f"{value:.0f}" if 1e4 <= abs(value) < 1e9 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s ({datetime.timedelta(seconds=round(seconds))})"


def summary(records: list[dict], run_dir: Path, config: dict, pngs: list[str]) -> str:
    """The markdown summary: run facts, first/last metric values, best eval loss, throughput, settings, plots."""
    steps = [r["step"] for r in records if r.get("step") is not None]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    lines = [f"# Training report: {run_dir.name}", "", f"- run folder: `{run_dir}`"]
    lines.append(f"- logged lines: {len(records)}, logged steps: {len(set(steps))}")
    if steps:
        lines.append(f"- final step: {max(steps)}")
    if len(times) > 1:
        lines.append(f"- wall-clock duration: {_duration(max(times) - min(times))}")

    keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    rows = [s for k in ["train/loss", *keys] if len((s := series(records, k)).steps) > 0]
    if rows:
        lines += ["", "## Metrics", "", "| metric | first (step) | last (step) | change |", "|---|---|---|---|"]
        for s in rows:
            first, last = s.values[0], s.values[-1]
            if "loss" in s.key:  # relative change for losses, absolute for accuracies, rewards, FAD ...
                change = f"{100 * (last - first) / abs(first):+.1f}%" if first else ""
            else:
                change = f"{last - first:+.4g}"
            lines.append(f"| {s.key} | {_fmt(first)} ({s.steps[0]}) | {_fmt(last)} ({s.steps[-1]}) | {change} |")

    best = []
    for key in ("eval/loss", "eval/loss_ema"):
        s = series(records, key)
        points = [(v, step) for step, v in zip(s.steps, s.values, strict=True) if math.isfinite(v)]
        if points:
            value, step = min(points)
            best.append(f"- best {key}: {_fmt(value)} at step {step}")
    if best:
        lines += ["", "## Best", "", *best]

    throughput = [(label, s.values) for k, label in THROUGHPUT.items() if (s := series(records, k)).values]
    if throughput:
        lines += ["", "## Mean throughput", ""]
        lines += [f"- {label}: {_fmt(sum(v) / len(v))}" for label, v in throughput]

    settings = [(k, config[k]) for k in SETTINGS if config.get(k) is not None]
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings]

    if pngs:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def _load(run_dir: Path) -> tuple[list[dict], dict]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a run's output_dir?")
    records = read_metrics(run_dir)  # a line being written, or cut short by a crash, is skipped with a warning
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE} is empty: the run logged nothing yet")
    config_path = run_dir / RUN_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return records, config


def _check_replaceable(report_dir: Path, run_dir: Path) -> None:
    # the target is deleted and replaced: never let a typo in --out wipe the run or some unrelated folder
    if report_dir == run_dir or report_dir in run_dir.parents:
        raise ValueError(f"report folder {report_dir} would replace the run folder {run_dir}")
    if report_dir.exists():
        if not report_dir.is_dir():
            raise ValueError(f"report folder {report_dir} exists and is not a folder")
        foreign = [p.name for p in report_dir.iterdir() if not (p.is_file() and p.suffix in (".png", ".md"))]
        if foreign:
            names = ", ".join(sorted(foreign)[:5])
            raise ValueError(f"{report_dir} holds more than a report ({names}); not replacing it")


def write_report(output_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> Path:
    """Write PNG plots and summary.md for the run in `output_dir` into `report_dir` (default output_dir/report)."""
    run_dir = Path(output_dir).resolve()
    records, config = _load(run_dir)
    report_dir = Path(report_dir).resolve() if report_dir is not None else run_dir / "report"
    _check_replaceable(report_dir, run_dir)

    # Build beside the target and swap it in at the end, so a failure never leaves half a report.
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.tmp-", dir=report_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared like the run folder
    old = report_dir.with_name(f"{tmp.name}-old")
    try:
        pngs = []
        for name, panel in panels(records).items():
            draw(panel, run_dir.name).savefig(tmp / f"{name}.png")
            pngs.append(f"{name}.png")
        (tmp / SUMMARY_FILE).write_text(summary(records, run_dir, config, pngs))
        if report_dir.exists():
            os.replace(report_dir, old)
        os.replace(tmp, report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not report_dir.exists():
            os.replace(old, report_dir)  # the swap itself failed: put the previous report back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return report_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_audio_trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl, maybe run_config.json)")
    parser.add_argument("--out", default=None, help="report folder (default: OUTPUT_DIR/report); replaced whole")
    args = parser.parse_args(argv)
    try:
        report_dir = write_report(args.output_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"report written to {report_dir}")


if __name__ == "__main__":
    main()
