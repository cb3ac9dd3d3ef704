"""An output folder across runs: what killed runs left is swept, a run resumed from an earlier step sets the later
steps aside, a new run starts clean of an old run's outputs.

Only what this toolkit wrote is touched: checkpoints, best/, frozen/, hidden `.tmp-*` / `.deleting-*` folders,
`superseded-*` folders, and the names the final export recorded. The folder may hold the user's own files; they stay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from hf_audio_trainer.checkpoint import (
    BEST,
    DELETING,
    FROZEN,
    FROZEN_STATE,
    PREFIX,
    STATE_FILE,
    WRITING,
    delete,
    list_checkpoints,
)
from hf_audio_trainer.trackers import METRICS_FILE

FINAL_MODEL = ".final_model.json"  # what the final export wrote: {"step": N, "names": [top-level names]}
SUPERSEDED = "superseded-"  # + the time: what a resume from an earlier step set aside
_SUPERSEDED = re.compile(rf"^{SUPERSEDED}\d{{8}}-\d{{6}}(-\d+)?$")


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


def set_aside_later_steps(output_dir: str | os.PathLike, resume: Path) -> tuple[Path, list[str]] | None:
    """For a run that resumes from the checkpoint `resume`: move what output_dir holds of later steps (checkpoints,
    best/, the final model) into a new superseded-<time>/ folder, with a copy of metrics.jsonl. `latest` and the
    rotation then see only the resumed run, which would otherwise lose its own checkpoints to the abandoned run's
    higher-numbered ones. Nothing is deleted. Returns the folder and what moved; None when nothing was later."""
    root, step = Path(output_dir), _saved_step(resume)
    if step is None:  # unreadable: the resume itself reports it
        return None
    later = [path for path in list_checkpoints(root) if int(path.name[len(PREFIX) :]) > step]
    moved = [path.name for path in later]
    best_step = _saved_step(root / BEST)
    if best_step is not None and best_step > step:
        later.append(root / BEST)
        moved.append(f"best/ of step {best_step}")
    final_step, exported = final_model(root)
    if final_step is not None and final_step > step:
        later += [*(path for path in exported if path.exists()), root / FINAL_MODEL]
        moved.append(f"the final model of step {final_step}")
    if not later:
        return None
    aside = _new_folder(root, f"{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}")
    for path in later:
        os.replace(path, aside / path.name)
    if (root / METRICS_FILE).is_file():  # the abandoned run's log: the resumed run cuts the live one at `step`
        shutil.copy2(root / METRICS_FILE, aside / METRICS_FILE)
    return aside, moved


def _saved_step(checkpoint: Path) -> int | None:
    try:
        step = json.loads((checkpoint / STATE_FILE).read_text())["global_step"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return step if isinstance(step, int) else None


def _new_folder(root: Path, name: str) -> Path:
    """root/name, created now, or root/name-2, -3 ... when taken (two rollbacks in one second)."""
    for folder in itertools.chain([root / name], (root / f"{name}-{n}" for n in itertools.count(2))):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder


def remove_run_outputs(output_dir: str | os.PathLike) -> None:
    """Delete an old run's outputs, for a new run in its folder (--overwrite_output_dir): its checkpoints, best/, its
    frozen parts (frozen/), its final model (`ema/` included) and what a rollback set aside, so none can pass for the
    new run's."""
    root = Path(output_dir)
    old = [*list_checkpoints(root), *final_model(root)[1]]
    old += [path for path in root.glob(f"{SUPERSEDED}*") if _SUPERSEDED.match(path.name) and path.is_dir()]
    if (root / BEST / STATE_FILE).is_file():
        old.append(root / BEST)
    if (root / FROZEN / FROZEN_STATE).is_file():
        old.append(root / FROZEN)
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
        names = sorted({path.name for path in final_model(root)[1]} | wrote)
        (root / FINAL_MODEL).write_text(json.dumps({"step": step, "names": names}))


def final_model(output_dir: str | os.PathLike) -> tuple[int | None, list[Path]]:
    """The step of the final model in output_dir and the paths its export wrote, by its record; (None, []) if none."""
    root = Path(output_dir)
    try:
        record = json.loads((root / FINAL_MODEL).read_text())
        step, names = record["step"], record["names"]
    except (OSError, ValueError, TypeError, KeyError):
        return None, []
    if not isinstance(step, int) or not isinstance(names, list):
        return None, []
    # plain names only: a damaged or edited record must never reach outside the folder
    return step, [root / n for n in names if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n]


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, modification time) of each entry but the hidden ones (the Hub pusher's thread deletes its staging
    folders at any moment; no export writes a hidden name)."""
    found = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        if not path.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                stat = path.lstat()
                found[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return found
