"""An output folder across runs: what killed runs left is swept, a new run starts clean of an old run's outputs.

Only what this toolkit wrote is touched: checkpoints, best/, hidden `.tmp-*` / `.deleting-*` folders, and the names the
final export recorded. The folder may hold the user's own files; they stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hf_audio_trainer.checkpoint import BEST, DELETING, STATE_FILE, WRITING, delete, list_checkpoints

FINAL_MODEL = ".final_model.json"  # what the final export wrote: {"step": N, "names": [top-level names]}


def sweep(output_dir: str | os.PathLike) -> list[str]:
    """Delete the hidden folders that killed runs left in output_dir (writes and deletes cut short); returns their
    names. Only under the output folder's lock: a running run's own are in use."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith((WRITING, DELETING)) and p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in stale]


def remove_run_outputs(output_dir: str | os.PathLike) -> None:
    """Delete an old run's outputs, for a new run in its folder (--overwrite_output_dir): its checkpoints, best/ and
    its final model (`ema/` included), so none can pass for the new run's."""
    root = Path(output_dir)
    old = [*list_checkpoints(root), *final_model(root)[1]]
    if (root / BEST / STATE_FILE).is_file():
        old.append(root / BEST)
    for path in [*old, root / FINAL_MODEL]:
        if path.exists() or path.is_symlink():
            delete(path)


@contextlib.contextmanager
def recorded_final_model(output_dir: str | os.PathLike, step: int, main_process: bool) -> Iterator[None]:
    """Around the final export into output_dir: record the names it wrote, so that a later new run there deletes
    them as this run's, and nothing else."""
    root = Path(output_dir)
    before = _identities(root) if main_process else {}
    yield
    if main_process:
        # an export renames its files and folders into place (new inodes) or writes into them (new times)
        wrote = {name for name, identity in _identities(root).items() if before.get(name) != identity}
        names = sorted({path.name for path in final_model(root)[1]} | {n for n in wrote if not n.startswith(".")})
        (root / FINAL_MODEL).write_text(json.dumps({"step": step, "names": names}))


def final_model(output_dir: str | os.PathLike) -> tuple[int | None, list[Path]]:
    """The step of the final model in output_dir and the paths its export wrote, by its record; (None, []) if none."""
    root = Path(output_dir)
    try:
        record = json.loads((root / FINAL_MODEL).read_text())
        step, names = record["step"], record["names"]
    except (OSError, ValueError, TypeError, KeyError):
        return None, []
    # plain names only: a damaged or edited record must never reach outside the folder
    return step, [root / n for n in names if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n]


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (st.st_ino, st.st_mtime_ns) for p in folder.iterdir() for st in [p.lstat()]}
