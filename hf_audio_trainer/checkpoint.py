"""Checkpoints that are never half-written: save, find the latest, rotate, resume, export the final model.

A checkpoint holds what trains (weights or adapters, optimizer, scheduler, RNG, EMA); a run's frozen parts (a text
encoder, a VAE or codec, a LoRA's base weights, the files that make a model folder) are stored once, in its `frozen/`
folder, which each checkpoint names and `best/` joins back in.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from hf_audio_trainer.distributed import broadcast_object
from hf_audio_trainer.ema import EMA
from hf_audio_trainer.errors import ConfigError, ExistsError, MissingError, WriteError, check
from hf_audio_trainer.hub import HubPusher
from hf_audio_trainer.models import WeightsDoNotFit, load_entries, merged_model, split_state_dict
from hf_audio_trainer.trackers import truncate_metrics

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX}(\d+)$")
# hidden folders of writes (checkpoints, best/, the final model, a Hub push's scratch export and staging copy: hub.py
# names them `.tmp-hub-push-*`) and of deletes in progress; a kill leaves them behind, the next start sweeps them
WRITING, DELETING = ".tmp-", ".deleting-"
FROZEN = "frozen"  # the run's frozen parts, stored once beside its checkpoints
FROZEN_STATE = "frozen.json"  # its id and files, written last: its presence marks the folder complete
JOINED = "frozen_joined"  # in best/'s record: the id of the frozen/ it joined in


@dataclass
class CheckpointConfig:
    """Checkpoints and resumption."""

    save_steps: int = field(default=100, metadata={"help": "Write a checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep at most N checkpoints (oldest go; best/ and a rollback's superseded-*/ do not count)."},
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (in output_dir) or a checkpoint folder to resume from."}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Metric that picks the best/ checkpoint; unset: eval/loss_ema with --ema, else eval/loss."},
    )
    greater_is_better: bool = field(default=False, metadata={"help": "Whether a larger metric is better."})
    allow_data_change: bool = field(
        default=False,
        metadata={
            "help": "Resume even when the seed or the training data (rows, or a stream's shards) differ from the "
            "checkpoint's: the data order then changes (refused without this flag)."
        },
    )

    def __post_init__(self) -> None:
        check(self.save_steps >= 1, f"save_steps={self.save_steps}: must be >= 1")
        check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            f"save_total_limit={self.save_total_limit}: must be >= 1, or unset to keep all",
        )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (a folder only gets its final name once complete)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume(
    resume_from_checkpoint: str | None, output_dir: str | os.PathLike, warn=logger.warning
) -> Path | None:
    """Turn `--resume_from_checkpoint` ('latest' or a path) into a checkpoint folder, or fail clearly.

    'latest' is the newest checkpoint that verifies: a damaged newer one (a corrupt state file, a truncated or
    missing file) is skipped with a warning (`warn`) naming it, so a run resumes from the last good state.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        damaged = []
        for path in reversed(list_checkpoints(output_dir)):
            try:
                verify_checkpoint(path)
            except ConfigError as err:
                warn(f"skipping {path.name}: {err}")
                damaged.append(err)
                continue
            return path
        if damaged:  # every one is damaged: the newest one's damage is the news
            raise damaged[0]
        raise MissingError(
            f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; "
            "drop the flag to start a new run, or pass a checkpoint folder"
        )
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise MissingError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE}); "
            f"pass 'latest' or a {PREFIX}N folder written by this toolkit"
        )
    return path


def check_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a new run's checkpoints with an old run's, unless asked to."""
    old = list_checkpoints(output_dir)
    if old and not resuming and not overwrite:
        raise ExistsError(
            f"output_dir {output_dir} already holds checkpoints ({old[-1].name}); pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to replace it, "
            "or another --output_dir"
        )


def delete(path: Path) -> None:
    """Delete a file, or a folder via a hidden name (`_doomed`)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(_doomed(path))
    else:
        path.unlink()


def _doomed(path: Path) -> Path:
    """Rename `path` to a hidden name to delete it there: a crash mid-delete leaves a hidden folder, never a broken
    checkpoint-N or best/; a unique name, so a leftover never blocks the next delete of the same name."""
    doomed = path.with_name(f"{DELETING}{path.name}-{secrets.token_hex(4)}")
    os.replace(path, doomed)
    return doomed


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete hidden folder to its final name, durably: its files and folders reach the disk before the
    rename, the rename itself right after; a folder it replaces is deleted only then.

    A host crash loses what is still in the page cache; without the fsyncs, the rotation that follows could delete
    the previous checkpoints while the new one exists only in memory, leaving nothing to resume from.
    """
    for path in [*sorted(tmp.rglob("*"), reverse=True), tmp]:  # a folder after what it holds
        _fsync(path)
    replaced = _doomed(final) if final.exists() else None
    os.replace(tmp, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    extra_save: Any = None,
    save_total_limit: int | None = None,
    rank_save: Any = None,
    store_frozen: Callable[[list[dict]], dict] | None = None,
) -> Path:
    """Write checkpoint-{step} into a hidden folder, then rename it into place; rotate old ones.

    Holds everything for exact resumption: model, optimizer, scheduler, RNG states of every rank (accelerate's
    save_state), plus `state` (step, data position ...) as JSON. `extra_save(folder)` adds files from the main
    process, `rank_save(folder)` from every process (its own shards).

    `store_frozen(frozen)`: the weights then hold only what trains (`models.split_state_dict`, under the unwrapped
    model's names); it receives the rest, one dict per network, stores it once per run (`Checkpointer`) and returns
    the record that names the store. FSDP2 and DeepSpeed save their own shards, whole: it then receives nothing.
    """
    root = Path(output_dir)
    final, tmp = root / f"{PREFIX}{step}", root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    record: dict[str, Any] = {}

    def trained_only(models: list, weights: list[dict], folder: str) -> None:
        frozen = []
        for model, entries in zip(models, weights, strict=False):  # no weights: the strategy saves its own shards
            trained, rest = split_state_dict(accelerator.unwrap_model(model))
            entries.clear()
            entries.update(trained)
            frozen.append(rest)
        record.update(store_frozen(frozen), **({WEIGHTS: "trained"} if weights else {}))

    with removed_on_failure(tmp, final.name, root):
        hook = accelerator.register_save_state_pre_hook(trained_only) if store_frozen is not None else None
        try:
            accelerator.save_state(str(tmp))
        finally:
            if hook is not None:
                hook.remove()
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
                json.dump({**state, **record, "files": files}, f, indent=2)
    if accelerator.is_main_process:
        _publish(tmp, final)  # every process's files are on disk before older checkpoints go
        if save_total_limit is not None:
            for old in list_checkpoints(root)[:-save_total_limit]:
                delete(old)
    accelerator.wait_for_everyone()
    return final


# what a failed write says when the disk is full, over quota or the file too large, from the OS, torch's zip writer
# ("unexpected pos 82048 vs 81940") or safetensors ("StorageFull")
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WRITE_FAILURE_TEXT = ("unexpected pos", "No space left", "StorageFull", "File too large", "FileTooLarge", "quota")


def write_failure(err: BaseException) -> str | None:
    """What went wrong if `err` (or what caused it) is a write the disk refused; None for anything else."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_FAILURES:
            return os.strerror(seen.errno)
        if any(text in str(seen) for text in WRITE_FAILURE_TEXT):
            return str(seen).strip().splitlines()[-1][:200]
        seen = seen.__cause__ or seen.__context__
    return None


class removed_on_failure:  # noqa: N801 (used as a `with` statement)
    """A write into a hidden folder that, if it fails, leaves nothing behind; a refused write (disk full ...) becomes a
    `WriteError` that names what failed and what is still intact. Other errors keep their traceback."""

    def __init__(self, tmp: Path, what: str, root: Path):
        self.tmp, self.what, self.root = tmp, what, root

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None:
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)  # every rank may try; what is gone stays gone
        reason = write_failure(err)
        if reason is None:
            return False
        # a final export goes into the output folder or a folder in it (ema/, a Hub push's scratch folder)
        kept = list_checkpoints(self.root) or list_checkpoints(self.root.parent)
        intact = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        raise WriteError(
            f"could not write {self.what} in {self.root}: the disk refused a write (full, over quota or a file size "
            f"limit: {reason}); the partial {self.tmp.name} was removed and {intact}. Free some space (or use another "
            "--output_dir) and continue with --resume_from_checkpoint latest"
        ) from err


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON state, after checking every file it lists is there with its saved size."""
    folder = Path(checkpoint)
    fix = "resume from an earlier checkpoint (pass its folder to --resume_from_checkpoint) or start again"
    try:
        with open(folder / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint {folder} is damaged: {STATE_FILE} cannot be read ({err}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ConfigError(f"checkpoint {folder} is damaged: {STATE_FILE} has no global_step; {fix}")
    check_files(folder, state.get("files", {}), f"checkpoint {folder}", fix)
    return state


def check_files(folder: Path, files: dict[str, int], what: str, fix: str) -> None:
    """Every file of `files` (name: size when saved) is in `folder` with that size, or a ConfigError names it."""
    for name, size in files.items():
        path = folder / name
        problem = "is missing" if not path.is_file() else None
        if problem is None and path.stat().st_size != size:
            problem = f"is truncated or altered ({path.stat().st_size} bytes, {size} when saved)"
        if problem:
            raise ConfigError(f"{what} is damaged: {path} {problem}; {fix}")


# how a checkpoint's model files hold the weights, under the unwrapped model's names: "trained" (what trains; the
# run's frozen/ folder holds the rest), "all" (best/, which joins them); unset: accelerate's own files (checkpoints
# written before frozen/ existed, and FSDP2's and DeepSpeed's shards)
WEIGHTS = "weights"


def load_checkpoint(
    accelerator: Accelerator, checkpoint: str | os.PathLike, state: dict | None = None, frozen: Path | None = None
) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the saved JSON state (`state`: already verified).

    `frozen`: where the checkpoint's frozen parts are (`frozen_parts_of`). A checkpoint of what trains is loaded
    together with them, and must hold exactly this run's trained entries (`WeightsDoNotFit` otherwise): another set
    of the same shapes (another --freeze_modules) would load and train the wrong weights.
    """
    checkpoint = Path(checkpoint)
    state = verify_checkpoint(checkpoint) if state is None else state
    saved_as = state.get(WEIGHTS)
    if saved_as is None:
        accelerator.load_state(str(checkpoint))
        return state
    store = frozen_parts_of(checkpoint, state) if frozen is None else frozen

    def load_weights(models: list, folder: str) -> None:
        for i, model in enumerate(models):
            saved = load_file(str(checkpoint / weights_name("model", i)))
            rest = store / weights_name(FROZEN, i)
            rest = load_file(str(rest)) if saved_as == "trained" and rest.is_file() else {}
            load_entries(accelerator.unwrap_model(model), saved, rest, split=saved_as == "trained")
        models.clear()  # loaded here; accelerate goes on with the optimizer, scheduler and RNG states

    hook = accelerator.register_load_state_pre_hook(load_weights)
    try:
        accelerator.load_state(str(checkpoint))
    finally:
        hook.remove()
    return state


def weights_name(stem: str, index: int) -> str:
    """accelerate's file names, one per network: model.safetensors, model_1.safetensors ..."""
    return f"{stem}_{index}.safetensors" if index else f"{stem}.safetensors"


def save_final_model(
    accelerator: Accelerator,
    model,
    output_dir: str | os.PathLike,
    extra_save: Any = None,
    merge_lora: bool = False,
    save_adapter: Callable[[Any, dict, Path], None] | None = None,
) -> None:
    """Write a `from_pretrained` folder (safetensors) into output_dir, file by file via a hidden folder.

    `merge_lora`: the model carries peft LoRA adapters; the folder gets a plain model with them merged in, and
    `save_adapter(peft_model, state_dict, folder)` (if given) writes the adapters beside it from the gathered state.
    """
    root = Path(output_dir)
    tmp = root / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        target = accelerator.unwrap_model(model)
        adapters = merge_lora and save_adapter is not None
        peft_model, gathered = target, state_dict
        if merge_lora:
            target, state_dict = merged_model(target, state_dict), None
        with removed_on_failure(tmp, f"the model for {root}", root):
            target.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if adapters:
                save_adapter(peft_model, gathered, tmp)
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
    """Copy a checkpoint to output_dir/best, outside the last-K rotation; the old best goes only once the new is in.

    best/ joins the run's frozen parts back in (`join_frozen`): it stands alone, as a model folder (a MusicGen's
    loads with `from_pretrained`) and as a checkpoint to resume from, whatever becomes of the run's other folders.
    """
    if accelerator.is_main_process:
        root = Path(output_dir)
        tmp, best = root / f".tmp-{BEST}", root / BEST
        shutil.rmtree(tmp, ignore_errors=True)
        store = frozen_parts_of(checkpoint)
        with removed_on_failure(tmp, f"{BEST}/ (a copy of {Path(checkpoint).name})", root):
            shutil.copytree(checkpoint, tmp)
            join_frozen(tmp, store)
        _publish(tmp, best)
    accelerator.wait_for_everyone()


def frozen_parts_of(checkpoint: str | os.PathLike, state: dict | None = None) -> Path:
    """Where a checkpoint's frozen parts are: its run's frozen/ folder, by the id the checkpoint records (beside it,
    or one folder up for one a rollback set aside in superseded-*/), checked like a checkpoint; or the checkpoint
    itself when it records none (written before frozen/ existed, or best/, which joins them in)."""
    checkpoint = Path(checkpoint)
    state = verify_checkpoint(checkpoint) if state is None else state
    wanted = state.get(FROZEN)
    if wanted is None:
        return checkpoint
    places = [checkpoint.parent / FROZEN, checkpoint.parent.parent / FROZEN]
    for folder in places:
        try:
            record = json.loads((folder / FROZEN_STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("id") == wanted:
            fix = "copy that run's frozen/ folder in again, or start a new run"
            check_files(folder, record.get("files", {}), f"the frozen parts {folder} of {checkpoint}", fix)
            return folder
    raise ConfigError(
        f"{checkpoint} keeps its frozen parts (text encoder, VAE or codec, the weights it does not train) in its run's "
        f"{FROZEN}/ folder, and none with its id {wanted} is in {' or '.join(str(p) for p in places)}: copy the "
        f"checkpoint together with its run's {FROZEN}/ folder (beside it), or resume from that run's best/"
    )


def stored_id(output_dir: str | os.PathLike) -> str | None:
    """The id of the frozen/ in output_dir; None if there is none."""
    try:
        return json.loads((Path(output_dir) / FROZEN / FROZEN_STATE).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def write_frozen(
    output_dir: str | os.PathLike, weights: list[dict], save_files: Callable[[Path], None] | None
) -> str | None:
    """Store a run's frozen parts in output_dir/frozen/, atomically as a checkpoint: the family's files
    (`save_files(folder)`: a pipeline's text encoder and VAE, a model folder's config) and each network's frozen
    entries (`weights`); returns the folder's new id, or None when there is nothing frozen (no folder)."""
    root = Path(output_dir)
    final, tmp = root / FROZEN, root / f"{WRITING}{FROZEN}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with removed_on_failure(tmp, f"{FROZEN}/", root):
        if save_files is not None:
            save_files(tmp)
        for i, entries in enumerate(weights):
            if entries:
                tensors = {name: value.detach().cpu().contiguous() for name, value in entries.items()}
                save_file(tensors, str(tmp / weights_name(FROZEN, i)), metadata={"format": "pt"})
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        if not files:
            shutil.rmtree(tmp)
            if final.exists():  # another run's, which a resume from elsewhere leaves behind
                delete(final)
            return None
        key = secrets.token_hex(8)
        (tmp / FROZEN_STATE).write_text(json.dumps({"id": key, "files": files}, indent=2))
    _publish(tmp, final)
    return key


def join_frozen(folder: Path, store: Path) -> None:
    """Make a copied checkpoint stand alone: the files of its frozen parts (`store`) copied in, each network's frozen
    weights merged into its model file, and its record saying so (weights "all", the frozen/ id as the one it joined:
    a rollback to it goes on with the same frozen/, which the run's other checkpoints name)."""
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get(FROZEN) is None:
        return
    for item in store.iterdir():
        if item.name == FROZEN_STATE or _FROZEN_WEIGHTS.match(item.name) or (folder / item.name).exists():
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    if state.get(WEIGHTS) == "trained":
        for rest in store.iterdir():
            if match := _FROZEN_WEIGHTS.match(rest.name):
                model_file = folder / weights_name("model", int(match.group(1) or 0))
                merged = {**load_file(str(rest)), **load_file(str(model_file))}
                save_file(merged, str(model_file), metadata={"format": "pt"})
        state[WEIGHTS] = "all"
    state[JOINED] = state.pop(FROZEN)
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    files.pop(STATE_FILE, None)
    (folder / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=2))


_FROZEN_WEIGHTS = re.compile(rf"^{FROZEN}(?:_(\d+))?\.safetensors$")


EMA_FILE = "ema.safetensors"  # the EMA state inside a checkpoint


class Checkpointer:
    """Saves every `save_steps` (atomic, last-K rotation), keeps `best/` by the chosen metric, resumes exactly."""

    def __init__(
        self,
        settings: CheckpointConfig,
        accelerator: Accelerator,
        output_dir: str | os.PathLike,
        global_batch: int,
        max_steps: int,
        config: dict[str, Any],
        save_extras: Callable[[Path], None],
        extra_state: Callable[[int], dict] = lambda step: {},
        ema: EMA | None = None,
        pusher: HubPusher | None = None,
        export: Callable[[Path, bool], None] | None = None,
        card: Callable[[Path, dict], None] | None = None,
        push: str | None = None,
        final_ema: bool = False,
        model_settings: list[str] | None = None,
        frozen_files: Callable[[Path], None] | None = None,
    ):
        """`config`: the run's flat settings, saved in every checkpoint; `model_settings` names those that shape the
        networks (a resume that does not fit names which differ). `push`: the Hub strategy when the run pushes
        (`hub.HUB_STRATEGIES`), None when it does not; `final_ema`: the output folder holds the EMA weights.
        `save_extras(folder)` adds files to every checkpoint; `frozen_files(folder)` writes the family's frozen parts,
        stored once per run in frozen/ with the weights no checkpoint holds (`write_frozen`)."""
        self.settings, self.accelerator, self.ema, self.pusher = settings, accelerator, ema, pusher
        self.export, self.card = export, card  # export(folder, use_ema); card(folder, metrics)
        self.out = Path(output_dir)
        self.global_batch, self.max_steps, self.config = global_batch, max_steps, config
        self.save_extras, self.extra_state = save_extras, extra_state
        self.push, self.final_ema, self.model_settings = push, final_ema, model_settings or []
        default = "eval/loss_ema" if ema is not None else "eval/loss"
        self.metric = settings.metric_for_best_model or default
        self.best: dict = {}  # {"step", "value"} of the best checkpoint so far
        self.last_eval: dict = {}
        self.frozen_files = frozen_files
        self.frozen: dict | None = None  # what each checkpoint records of frozen/, once the first save stored it
        self.reusable: str | None = None  # the id of the frozen/ in output_dir the resumed checkpoint already names

    def resume(self, path: Path, frozen: Path | None = None) -> int:
        """Load a checkpoint into the prepared objects; returns its step. Mismatches are refused before loading.

        `frozen`: where its frozen parts are (`frozen_parts_of`, the main process's answer)."""
        state = verify_checkpoint(path)
        if state["global_batch_size"] != self.global_batch:
            raise ConfigError(
                f"{path} was trained with a global batch of {state['global_batch_size']}, this run has "
                f"{self.global_batch} (per-device batch x accumulation x processes); keep it the same to resume exactly"
            )
        here = (str(self.accelerator.distributed_type), self.accelerator.num_processes)
        there = (state.get("distributed_type", here[0]), state.get("num_processes", here[1]))
        sharded = ("DistributedType.FSDP", "DistributedType.DEEPSPEED")
        if there != here and (here[0] in sharded or there[0] in sharded):
            raise ConfigError(
                f"{path} holds shards from {there[1]} processes under {there[0]}; this run is {here[1]} under "
                f"{here[0]}. Resume with the same accelerate config and number of processes (or start a new run from "
                f"its exported model with --model_name_or_path)"
            )
        ema_file = path / self.ema_file()
        if self.ema is not None and not ema_file.is_file():
            raise ConfigError(f"{path} has no {ema_file.name}: it was trained without --ema; resume without it")
        frozen = frozen_parts_of(path, state) if frozen is None else frozen
        recorded = state.get(FROZEN, state.get(JOINED))
        if recorded is not None and stored_id(self.out) == recorded:
            self.reusable = recorded  # the run goes on in its own folder: its frozen/ serves the next saves
        try:
            load_checkpoint(self.accelerator, path, state, frozen)
        except RuntimeError as err:
            if not isinstance(err, WeightsDoNotFit) and not any(text in str(err) for text in LOAD_MISMATCH):
                raise
            raise ConfigError(
                f"{path} does not fit this run's model: "
                f"{settings_that_differ(self.model_settings, self.config, state.get('config', {}))}; "
                "resume with the checkpoint's settings, or start a new run in another --output_dir"
            ) from None
        # the best so far is what best/ holds, by its own record (another metric's best/ counts as none: the first
        # evaluated save starts the comparison); the checkpoint's record may be ahead of it: a kill cut its copy short.
        # The main process's view on every rank: only it changes best/, and every rank must judge later saves alike
        held, claim = broadcast_object((self.recorded_best(self.out / BEST), self.recorded_best(path)))
        self.best = held
        if claim.get("step") == state["global_step"] and claim != held and self.beats(claim["value"]):
            copy_to_best(self.accelerator, self.out, path)  # this checkpoint was the new best: finish its copy
            self.best = claim
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(ema_file)))
        if self.accelerator.is_main_process:
            truncate_metrics(self.out, state["global_step"])
        self.accelerator.print(f"Resumed from {path} at step {state['global_step']}")
        return state["global_step"]

    def ema_file(self) -> str:
        """One file of averages, or one per process when each averages its own shard (FSDP2, ZeRO-3)."""
        if self.ema is not None and self.ema.sharded:
            return f"ema-rank{self.accelerator.process_index}-of-{self.accelerator.num_processes}.safetensors"
        return EMA_FILE

    def recorded_best(self, checkpoint: Path) -> dict:
        """The {"step", "value"} of the best a checkpoint's state records by this run's metric; {} if none."""
        try:
            saved = json.loads((checkpoint / STATE_FILE).read_text()).get("best") or {}
        except (OSError, ValueError, AttributeError):
            return {}
        if "value" not in saved or saved.get("metric", self.metric) != self.metric:
            return {}
        return {"step": saved["step"], "value": saved["value"]}

    def beats(self, value: float) -> bool:
        """Whether `value` of the metric is better than the best so far (any value beats none)."""
        best = self.best
        return not best or (value > best["value"] if self.settings.greater_is_better else value < best["value"])

    def record(self, step: int, results: dict[str, float]) -> None:
        self.last_eval = {**results, "step": step}

    def save(self, step: int) -> None:
        # best is judged where a save follows an evaluation of the same step
        value = self.last_eval.get(self.metric) if self.last_eval.get("step") == step else None
        is_best = value is not None and self.beats(value)
        if is_best:
            self.best.update(step=step, value=value)
        state = {
            "global_step": step,
            "global_batch_size": self.global_batch,
            "max_steps": self.max_steps,
            "num_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "config": self.config,
            "best": {**self.best, "metric": self.metric},  # {"metric"} alone until an evaluated save
            **self.extra_state(step),
        }

        def extras(folder: Path) -> None:
            self.save_extras(folder)
            if self.ema is not None and not self.ema.sharded:
                save_file(self.ema.state_dict(), str(folder / EMA_FILE))

        def shards(folder: Path) -> None:
            save_file(self.ema.state_dict(), str(folder / self.ema_file()))

        sharded_ema = self.ema is not None and self.ema.sharded
        saved = save_checkpoint(
            self.accelerator, self.out, step, state, extras, self.settings.save_total_limit,
            rank_save=shards if sharded_ema else None, store_frozen=self.store_frozen,
        )  # fmt: skip
        if is_best:
            copy_to_best(self.accelerator, self.out, saved)
        if self.push is not None and self.push != "end":
            self.push_model(self.last_eval, checkpoint=Path(saved), step=step)

    def store_frozen(self, weights: list[dict]) -> dict:
        """At the run's first save, its frozen parts (the family's files, `weights` each network does not train) go
        into output_dir/frozen/, unless the resumed checkpoint's are already there; the record every checkpoint
        keeps of them. On the main process (only it writes the checkpoint's record)."""
        if self.frozen is None and self.accelerator.is_main_process:
            key = self.reusable if self.reusable is not None else write_frozen(self.out, weights, self.frozen_files)
            self.frozen = {FROZEN: key} if key is not None else {}
            if key is not None and self.pusher is not None and self.push == "checkpoint":
                # before any last-checkpoint/ that names it, so a resume from the Hub finds both
                self.pusher.push(self.out / FROZEN, "Frozen parts of the run", path_in_repo=FROZEN)
        return self.frozen or {}

    def push_model(self, metrics: dict, checkpoint: Path | None = None, step: int | None = None) -> Future | None:
        """Export the current model (and `ema/`) with a model card to a scratch folder and push that in the background.

        After a save (`step` given) the pusher's strategy decides what goes (`checkpoint` also sends the checkpoint
        to `last-checkpoint/`, so a run can resume from the Hub); without one, this is the end-of-training push, whose
        Future it returns (None on the other processes and after a save). The scratch folder and the pusher's
        snapshots are named `.tmp-*`, so the start-of-run sweep removes those a killed run left.
        """
        if self.push is None or self.export is None:
            return None
        self.accelerator.wait_for_everyone()
        scratch = (
            Path(tempfile.mkdtemp(dir=self.out, prefix=".tmp-push-")) if self.accelerator.is_main_process else None
        )
        scratch = Path(broadcast_object(str(scratch)))
        self.export(scratch, self.final_ema)  # a collective under sharding: every rank takes part
        if self.ema is not None:
            self.export(scratch / "ema", True)
        final = None
        if self.pusher is not None:
            self.card(scratch, metrics)
            # the pusher snapshots the folders first, so the scratch folder can go at once
            if step is None:
                final = self.pusher.push(scratch, "End of training")
            else:
                self.pusher.push_save(scratch, checkpoint, step)
        if self.accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
        return final


# what torch says when a checkpoint's weights do not fit the model they are loaded into
LOAD_MISMATCH = ("size mismatch", "Missing key(s)", "Unexpected key(s)", "Error(s) in loading state_dict")


def settings_that_differ(names: list[str], now: dict[str, Any], saved: dict[str, Any]) -> str:
    """The model-shaping settings (`names`) of this run (`now`, flat) that differ from a checkpoint's (its saved flat
    config)."""
    differ = [f"{n}={now[n]!r} here, {saved[n]!r} in the checkpoint" for n in names if saved.get(n, now[n]) != now[n]]
    return "; ".join(differ) if differ else "its weights have other shapes (no setting of this run differs from it)"
