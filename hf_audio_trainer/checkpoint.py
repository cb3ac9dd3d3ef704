"""Checkpoints that are never half-written: save, find the latest, rotate, resume, export the final model."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_audio_trainer.models import merged_model

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (a folder only gets its final name once complete)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn `--resume_from_checkpoint` ('latest' or a path) into a checkpoint folder, or fail clearly."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; "
                "drop the flag to start a new run, or pass a checkpoint folder"
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE}); "
            f"pass 'latest' or a {PREFIX}N folder written by this toolkit"
        )
    return path


def check_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a new run's checkpoints with an old run's, unless asked to."""
    old = list_checkpoints(output_dir)
    if old and not resuming and not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already holds checkpoints ({old[-1].name}); pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to replace it, "
            "or another --output_dir"
        )


def remove_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete every checkpoint of an old run (--overwrite_output_dir)."""
    for path in list_checkpoints(output_dir):
        _remove(path)


def _remove(path: Path) -> None:
    # rename first so a crash mid-delete leaves a hidden folder, never a broken checkpoint-N
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    extra_save: Any = None,
    save_total_limit: int | None = None,
    rank_save: Any = None,
) -> Path:
    """Write checkpoint-{step} into a hidden folder, then rename it into place; rotate old ones.

    Holds everything for exact resumption: model, optimizer, scheduler, RNG states of every rank (accelerate's
    save_state), plus `state` (step, data position ...) as JSON. `extra_save(folder)` adds files (the tokenizer)
    from the main process, `rank_save(folder)` from every process (its own shards).
    """
    root = Path(output_dir)
    final, tmp = root / f"{PREFIX}{step}", root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if rank_save is not None:
        rank_save(tmp)
    # every process has written its own files (RNG state, shards) before the manifest lists them and the folder
    # moves: save_state has no barrier at its end, and a fast main process renamed the folder under a slow rank
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra_save is not None:
            extra_save(tmp)
        # every file and its size, so a damaged checkpoint is named at load time instead of failing deep in torch
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        # the state file is written last: its presence marks the checkpoint complete
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        if save_total_limit is not None:
            for old in list_checkpoints(root)[:-save_total_limit]:
                _remove(old)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON state, after checking every file it lists is there with its saved size."""
    folder = Path(checkpoint)
    with open(folder / STATE_FILE) as f:
        state = json.load(f)
    for name, size in state.get("files", {}).items():
        path = folder / name
        problem = "is missing" if not path.is_file() else None
        if problem is None and path.stat().st_size != size:
            problem = f"is truncated or altered ({path.stat().st_size} bytes, {size} when saved)"
        if problem:
            raise ValueError(
                f"checkpoint {folder} is damaged: {path} {problem}; resume from an earlier checkpoint "
                f"(pass its folder to --resume_from_checkpoint) or start again"
            )
    return state


def load_checkpoint(accelerator: Accelerator, checkpoint: str | os.PathLike, state: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the saved JSON state (`state`: already verified)."""
    state = verify_checkpoint(checkpoint) if state is None else state
    accelerator.load_state(str(checkpoint))
    return state


def save_final_model(
    accelerator: Accelerator, model, output_dir: str | os.PathLike, extra_save: Any = None, merge_lora: bool = False
) -> None:
    """Write a `from_pretrained` folder (safetensors) into output_dir, file by file via a hidden folder.

    `merge_lora`: the model carries peft LoRA adapters; the folder gets a plain model with them merged in.
    """
    root = Path(output_dir)
    tmp = root / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        target = accelerator.unwrap_model(model)
        if merge_lora:
            target, state_dict = merged_model(target, state_dict), None
        target.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if extra_save is not None:
            extra_save(tmp)
        for item in tmp.iterdir():
            target = root / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
    accelerator.wait_for_everyone()


BEST = "best"


def copy_to_best(accelerator: Accelerator, output_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Copy a checkpoint to output_dir/best, outside the last-K rotation; the old best goes only once the new is in."""
    if accelerator.is_main_process:
        root = Path(output_dir)
        tmp, best = root / f".tmp-{BEST}", root / BEST
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp)
        if best.exists():
            _remove(best)
        os.replace(tmp, best)
    accelerator.wait_for_everyone()
