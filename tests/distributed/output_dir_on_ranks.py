"""Run under `accelerate launch` by test_ddp_output_dir.py: how each rank of a two-process run starts in its output
folder when the filesystem misleads some of them.

Usage: output_dir_on_ranks.py MODE OUT RESULTS
- `stale`: OUT holds checkpoint-2 and checkpoint-4; rank 1's listing misses the newest (a stale listing on a network
  filesystem). Each rank resolves `--resume_from_checkpoint latest`.
- `separate`: each rank gets OUT/rank{R} as its output folder: the same path on two machines' own disks.
Writes RESULTS/rank{R}.json: the world size and what the rank got (the checkpoint it resumes, or the error it stopped
with).
"""

import json
import os
import sys
from pathlib import Path

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.config import resolve_config
from hf_audio_trainer.errors import UserError
from hf_audio_trainer.stages.common import start_run


def main(mode: str, out: str, results: str) -> None:
    rank = int(os.environ["RANK"])  # before the run's accelerator exists (a PartialState now would be a CPU one)
    settings = {"output_dir": out, "report_to": "none"}
    if mode == "stale":
        settings["resume_from_checkpoint"] = "latest"
        if rank == 1:
            listed = ckpt.list_checkpoints
            ckpt.list_checkpoints = lambda folder: listed(folder)[:-1]
    else:
        settings["output_dir"] = str(Path(out) / f"rank{rank}")
    record = {}
    try:
        with start_run(resolve_config(settings), "pretrain") as run:
            record = {"world": run.accelerator.num_processes, "rank": run.accelerator.process_index}
            record["resume"] = run.resume.name if run.resume is not None else None
    except UserError as err:
        record = {"world": int(os.environ["WORLD_SIZE"]), "rank": rank, "error": str(err)}
    Path(results, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
