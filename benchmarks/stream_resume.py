"""Resuming a stream: time to the first batch after resuming at step 10 vs step 1,000 (and 10,000), and what a
replaying resume (iterate and throw away, as IterableDataset skipping does) would cost at the same steps.

The data: parquet shards of short synthetic audio rows (bytes in an Audio struct, as `datasets` writes them).
The toolkit resumes through `stream_state` (arithmetic over the shards' row counts) and `ShardStream.iter_epoch`,
which opens the one shard that holds the position and reads from its row group; `rows_read` counts the rows it
decoded. Ratios are medians of 5 repeats, measured in the same run.

    python benchmarks/stream_resume.py [--shards 40 --rows_per_shard 500 --batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hf_audio_trainer.data.streaming import ShardStream, list_shards, stream_state


def write_shards(folder: Path, shards: int, rows: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(shards):
        audio = [{"bytes": rng.bytes(2000), "path": f"{i}-{j}.wav"} for j in range(rows)]
        table = pa.table({"audio": audio, "id": list(range(i * rows, (i + 1) * rows))})
        pq.write_table(table, folder / f"train-{i:05d}-of-{shards:05d}.parquet", row_group_size=100)


def first_batch(stream: ShardStream, step: int, batch: int, replay: bool) -> tuple[float, int]:
    """Seconds to the first batch after `step` steps, and the rows decoded on the way."""
    stream.rows_read = 0
    start = time.perf_counter()
    if replay:  # what a resume that re-reads the data does: iterate from the epoch's start, dropping rows
        rows = stream.iter_epoch(0)
        for _ in range(step * batch):
            next(rows)
    else:
        epoch, row = stream_state(step, batch, stream)
        rows = stream.iter_epoch(epoch, row)
    for _ in range(batch):
        next(rows)
    return time.perf_counter() - start, stream.rows_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--rows_per_shard", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.shards, args.rows_per_shard)
        stream = ShardStream(list_shards(tmp), seed=0)
        steps = [s for s in (10, 1000, 10000) if s * args.batch < stream.rows_per_rank(0)]
        results = {}
        for replay in (False, True):
            for step in steps:
                timings = [first_batch(stream, step, args.batch, replay) for _ in range(5)]
                results[replay, step] = (statistics.median(t for t, _ in timings), timings[0][1])
    print(f"| resume | {' | '.join(f'step {s}' for s in steps)} | step {steps[-1]} / step {steps[0]} |")
    print(f"|---|{'---|' * len(steps)}---|")
    for replay, name in ((False, "toolkit (seek)"), (True, "replay")):
        cells = [f"{results[replay, s][0] * 1000:.1f} ms, {results[replay, s][1]} rows" for s in steps]
        ratio = results[replay, steps[-1]][0] / results[replay, steps[0]][0]
        print(f"| {name} | {' | '.join(cells)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
