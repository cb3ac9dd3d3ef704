"""Peak RSS and time to the first optimizer step of `recipes/pretrain.py` at 2k, 20k and 200k synthetic clips.

The data path must not hold the dataset in RAM: the synthetic clips are generated straight into Arrow files in the
preprocessing cache and tokenized into it by `encode_dataset`, both memory-mapped. Target: peak RSS grows by at
most 10% from 20k to 200k clips (200k clips are ~97 hours of audio, ~22 GB of float32 samples on disk).

Each size runs twice, each time as a fresh process (a micro model, one optimizer step, no eval, no tracker):
  first run   the cache is empty: generate the clips, fit the mel k-means tokenizer, tokenize, train one step;
  second run  the same command on the same cache (a new output folder): the steady state of every later run, which
              only memory-maps what the first one wrote.
Peak RSS is the child's own ru_maxrss (os.wait4); it counts the file-backed pages of the memory-mapped cache that
the process touched while they stay resident (page cache the kernel can drop), so the peak of RssAnon (polled from
/proc every 0.1 s: the memory that cannot be dropped) is reported beside it. Time to first step = from starting
the process to the `time` of the step-1 row in output_dir/metrics.jsonl (interpreter start, imports, data
preparation and model build included).
Time is for a whole run (~12 min of tokenizing for 200k clips on 2 CPU cores); `--sizes 2000,20000` for a quick one.

    python benchmarks/data_scale.py [--sizes 2000,20000,200000] [--workdir DIR] [--out results.md]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_audio_trainer.trackers import read_metrics

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain.py"
GROWTH_TARGET = 10.0  # % peak-RSS growth allowed from 20k to 200k clips
POLL_SECONDS = 0.1


def run_once(num_clips: int, output_dir: Path, cache_dir: Path) -> dict:
    """One pretrain process on `num_clips` clips: its peak RSS (GB), time to the first step (s), whole run (s)."""
    command = [
        sys.executable, str(RECIPE), "--synthetic_num_clips", str(num_clips), "--max_steps", "1",
        "--model_size", "micro", "--report_to", "none", "--output_dir", str(output_dir),
        "--preprocessing_cache_dir", str(cache_dir), "--eval_steps", "0", "--eval_on_start", "false",
        "--save_steps", "1000", "--logging_steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = output_dir.with_suffix(".log")
    start = time.time()
    with open(log, "wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak_anon = 0
        while True:  # wait4: this child's own rusage (RUSAGE_CHILDREN would be the max over all the runs)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, anonymous_rss_kb(child.pid))
            time.sleep(POLL_SECONDS)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if child.returncode != 0:
        sys.exit(f"data_scale.py: error: {num_clips} clips: pretrain exited {child.returncode}; see {log}")
    first = next(m for m in read_metrics(output_dir) if m["step"] == 1 and "train/loss" in m)
    return {
        "rss_gb": usage.ru_maxrss / 2**20, "anon_gb": peak_anon / 2**20, "first_step_s": first["time"] - start,
        "wall_s": wall,
    }  # fmt: skip


def anonymous_rss_kb(pid: int) -> int:
    """RssAnon of a live process (KB): its RSS less the file-backed pages, which the kernel can drop at any time."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just exited
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)


def cache_files(cache_dir: Path) -> int:
    """Arrow files in the cache: a second run that finds the cache adds none."""
    return sum(1 for _ in cache_dir.rglob("*.arrow"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,200000", help="comma-separated clip counts")
    parser.add_argument("--workdir", default=None, help="keep outputs and caches here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        rows = {}
        for n in sizes:
            cache = root / f"cache-{n}"  # one cache per size, so a size's first run always starts empty
            first = run_once(n, root / f"run-{n}-first", cache)
            before = cache_files(cache)
            second = run_once(n, root / f"run-{n}-second", cache)
            rows[n] = (first, second, cache_files(cache) == before)
            print(
                f"{n} clips: first {first['rss_gb']:.2f} GB {first['first_step_s']:.1f} s, "
                f"second {second['rss_gb']:.2f} GB {second['first_step_s']:.1f} s",
                flush=True,
            )
    lines = [
        f"Peak RSS and time to first step of recipes/pretrain.py (micro model, 1 step), {os.cpu_count()} CPUs",
        "",
        "| clips | first-run peak RSS (GB) | first-run peak RssAnon (GB) | second-run peak RSS (GB) "
        "| second-run peak RssAnon (GB) | first-run time to step 1 (s) | second-run time to step 1 (s) "
        "| second run found the cache |",
        "|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for n, (first, second, hit) in rows.items():
        lines.append(
            f"| {n:,} | {first['rss_gb']:.2f} | {first['anon_gb']:.2f} | {second['rss_gb']:.2f} "
            f"| {second['anon_gb']:.2f} | {first['first_step_s']:.1f} "
            f"| {second['first_step_s']:.1f} | {'yes' if hit else 'NO: it tokenized again'} |"
        )
    if 20000 in rows and 200000 in rows:
        lines.append("")
        for (i, run), (key, what) in itertools.product(
            enumerate(("first", "second")), (("rss_gb", "RSS"), ("anon_gb", "RssAnon"))
        ):
            growth = 100 * (rows[200000][i][key] / rows[20000][i][key] - 1)
            verdict = "meets" if growth <= GROWTH_TARGET else "misses"
            lines.append(
                f"{run}-run peak {what} growth 20k -> 200k clips: {growth:+.1f}% ({verdict} the "
                f"<= {GROWTH_TARGET:.0f}% target)"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
