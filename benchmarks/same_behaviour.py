"""Does a change keep behaviour? The recipes' runs in two checkouts, side by side: the losses they log and the files
they export must agree.

    git worktree add ../before <commit>        # the checkout before the change
    python benchmarks/same_behaviour.py --before ../before [--max_steps 40] [--out /tmp/same_behaviour]

Runs, in each checkout, with the same flags, one thread and the same seed: pretrain (musicgen), finetune and align
from it, codec, pretrain --model_family musicgen_text over that codec, and pretrain --model_family flow. Compares
every loss-like value of metrics.jsonl (relative 1e-6) and every file of each final export (bit for bit, but for the
side's own output path where a config records it; the run's logs, config record, checkpoints and samples are not the
export). Prints one line per run; exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_EXPORTED = ("metrics.jsonl", "run_config.json", "runs", "samples", "checkpoint-", "best", ".lock", "report")
TIMINGS = ("time", "per_second", "step_time", "wait", "rss", "gpu", "mfu", "cpu")


def runs(out: Path, steps: int) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe, flags); later runs start from earlier ones' output folders."""
    short = ["--max_steps", str(steps), "--eval_steps", str(steps // 2), "--save_steps", str(steps),
             "--report_to", "none"]  # fmt: skip
    return {
        "pretrain": ("pretrain", [*short, "--output_dir", str(out / "pretrain")]),
        "finetune": (
            "finetune",
            [*short, "--model_name_or_path", str(out / "pretrain"), "--output_dir", str(out / "finetune")],
        ),  # fmt: skip
        "align": ("align", [*short, "--model_name_or_path", str(out / "finetune"), "--output_dir", str(out / "align")]),
        "codec": ("codec", [*short, "--output_dir", str(out / "codec")]),
        "musicgen_text": (
            "pretrain",
            [
                *short,
                "--model_family",
                "musicgen_text",
                "--tokenizer",
                str(out / "codec"),
                "--output_dir",
                str(out / "musicgen_text"),
            ],
        ),  # fmt: skip
        "flow": ("pretrain", [*short, "--model_family", "flow", "--output_dir", str(out / "flow")]),
    }


def run_all(checkout: Path, out: Path, steps: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(checkout)}  # fmt: skip
    for name, (recipe, flags) in runs(out, steps).items():
        if (out / name / "metrics.jsonl").is_file() and any((out / name).glob("*.json")):
            continue  # finished earlier: --out keeps runs between calls
        done = subprocess.run([sys.executable, str(checkout / "recipes" / f"{recipe}.py"), *flags], env=env,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{checkout}: {name} failed:\n{done.stderr[-3000:]}")


def losses(folder: Path) -> dict[tuple[int, str], float]:
    values = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time") and not any(t in key for t in TIMINGS) and isinstance(value, float):
                values[record["step"], key] = value
    return values


def export_files(folder: Path) -> dict[str, bytes]:
    """The export's files; the side's own folder, which a config may record (`_name_or_path`), reads as `<out>`."""
    side = str(folder.parent).encode()
    return {
        str(f.relative_to(folder)): f.read_bytes().replace(side, b"<out>")
        for f in sorted(folder.rglob("*"))
        if f.is_file() and not any(str(f.relative_to(folder)).startswith(p) for p in NOT_EXPORTED)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="The checkout before the change.")
    parser.add_argument("--after", type=Path, default=ROOT, help="The checkout after it (default: this one).")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/same_behaviour"))
    args = parser.parse_args()
    for side, checkout in (("before", args.before), ("after", args.after)):
        run_all(checkout.resolve(), args.out / side, args.max_steps)
    failed = False
    for name in runs(args.out, args.max_steps):
        a, b = args.out / "before" / name, args.out / "after" / name
        la, lb = losses(a), losses(b)
        worst = max((abs(la[k] - lb[k]) / max(abs(la[k]), 1e-12) for k in la.keys() & lb.keys()), default=math.nan)
        fa, fb = export_files(a), export_files(b)
        differ = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
        same = la.keys() == lb.keys() and worst <= 1e-6 and not differ
        failed |= not same
        print(
            f"{name:14s} {len(la):4d} logged values, largest relative difference {worst:.1e}; "
            f"{len(fa)} exported files, {len(differ)} differ {differ[:3] if differ else ''}"
            f"{'' if la.keys() == lb.keys() else ' (different metrics logged)'} -> {'same' if same else 'DIFFERENT'}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
