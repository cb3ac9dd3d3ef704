"""Where a stage runs: its Accelerator (and the output folder's lock) for one stage, and `accelerator.prepare` for
whichever strategy the launch config chose (DDP, FSDP2, DeepSpeed ZeRO), with those strategies' quirks."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from hf_audio_trainer.errors import ConfigError, ExistsError, LockedError, UserError
from hf_audio_trainer.lock import OutputLock
from hf_audio_trainer.trackers import JSONLinesTracker


@contextlib.contextmanager
def stage_accelerator(
    output_dir: str | os.PathLike,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    trackers: list[str] | None = None,
) -> Iterator[Accelerator]:
    """An Accelerator for one stage, holding the output folder's lock, both released afterwards (on every exit), so a
    notebook can run the next stage in the same process. `trackers`: accelerate's names, beside metrics.jsonl."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ExistsError(f"--output_dir {out} is a file, not a folder; pass the path of a folder (new or existing)")
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        # DeepSpeed without a GPU (trying a ZeRO config on a laptop, CI): its default backend is NCCL, so say gloo.
        # The CPU flag must stay off: with it each rank believes it is alone and they race on the checkpoint.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=[JSONLinesTracker(output_dir), *(trackers or [])],
        project_dir=str(output_dir),
        # the schedule counts optimizer steps; accelerate would otherwise step it once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    lock = OutputLock(out)
    try:
        held_elsewhere = None
        if accelerator.is_main_process:  # one lock per output folder, however many processes and machines
            try:
                note = lock.acquire()
                if note is not None:
                    accelerator.print(f"{out}: {note}")
            except LockedError as err:
                held_elsewhere = str(err)
        if accelerator.num_processes > 1:  # every rank stops, with the same message
            held_elsewhere = broadcast_object(held_elsewhere)
        if held_elsewhere is not None:
            raise LockedError(held_elsewhere)
        yield accelerator
        # a stage that ended well: no rank tears down its connections (or, rank 0, the rendezvous store the others
        # still use) while another is still writing or in its last collective
        accelerator.wait_for_everyone()
    finally:
        lock.release()
        accelerator.end_training()  # destroys the process group
        # accelerate keeps its settings in process-wide singletons; clear them so the next stage can use, say,
        # another precision
        AcceleratorState._reset_state()
        GradientState._reset_state()


def broadcast_object(value):
    """The main process's value on every rank."""
    box = [value]
    broadcast_object_list(box)
    return box[0]


T = TypeVar("T")


def on_main(accelerator: Accelerator, compute: Callable[[], T]) -> T:
    """`compute()` on the main process only, and its answer on every rank; a user's mistake it raises is raised on
    every rank, so all stop with the same line. One answer for all: ranks that each ask the filesystem can get
    different ones (a stale listing on a network filesystem)."""
    answer, error = None, None
    if accelerator.is_main_process:
        try:
            answer = compute()
        except UserError as err:
            error = err
    if accelerator.num_processes > 1:
        answer, error = broadcast_object((answer, error))
    if error is not None:
        raise error
    return answer


def check_shared_folder(accelerator: Accelerator, folder: str | os.PathLike) -> None:
    """Refuse an output folder that the machines of a run do not share: a checkpoint is one folder that every rank
    writes its shards into, so on separate disks the main process's copy would lack the others' files. The main
    process leaves a note there; every process must see it."""
    if accelerator.num_processes == 1:
        return
    folder = Path(folder)
    note = None
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        note = f".shared-{uuid.uuid4().hex}"
        (folder / note).write_text(socket.gethostname())
    note, named = broadcast_object((note, str(folder)))  # the main process's name for it, in every rank's message
    seen = gather_object([((folder / note).is_file(), accelerator.process_index, socket.gethostname())])
    if accelerator.is_main_process:
        (folder / note).unlink(missing_ok=True)
    blind = [(rank, host) for visible, rank, host in seen if not visible]
    if blind:
        rank, host = blind[0]
        raise ConfigError(
            f"--output_dir {named} is not shared by all machines: process {rank} on {host} (and {len(blind) - 1} "
            "more) cannot see what the main process wrote there; put it on a filesystem every machine mounts at the "
            "same path (NFS, Lustre, a shared disk)"
        )


def check_tensor_parallel(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Tensor parallelism (`--parallelism_config_tp_size N`) needs a model with a transformers `tp_plan`."""
    parallel = accelerator.parallelism_config
    if parallel is None or parallel.tp_size <= 1:
        return
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    if not getattr(base, "_tp_plan", None) and not getattr(base.config, "base_model_tp_plan", None):
        raise ConfigError(
            f"tensor parallelism (tp_size={parallel.tp_size}) needs a model with a tensor-parallel plan, and "
            f"transformers has none for {type(base).__name__}: shard it with FSDP2 or ZeRO-3 instead "
            f"(accelerate_configs/fsdp2.yaml, deepspeed_zero3.yaml) and drop --parallelism_config_tp_size"
        )


def prepare(
    accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler, micro_batch_size: int, max_grad_norm: float
):
    """`accelerator.prepare` for whichever strategy the launch config chose (DDP, FSDP2, DeepSpeed ZeRO)."""
    check_tensor_parallel(accelerator, model)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:
        # DeepSpeed's engine clips and sizes its buffers from its own config: our flags are the source of truth (no
        # dataloader goes through prepare, so accelerate cannot infer the micro-batch)
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = max_grad_norm
    if not accelerator.is_fsdp2:
        return accelerator.prepare(model, optimizer, scheduler)
    # accelerate's FSDP2 wrapping gives the input embeddings and the output head groups of their own, assuming one
    # module each; a multi-codebook model (MusicGen) has one per codebook in a ModuleList, which fully_shard refuses
    # ("containers that do not implement forward"). Hidden during prepare, they are sharded with the root group.
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    hidden = [
        name
        for name in ("get_input_embeddings", "get_output_embeddings")
        if isinstance(getattr(base, name, lambda: None)(), torch.nn.ModuleList)
    ]
    for name in hidden:
        setattr(base, name, lambda: None)
    try:
        return accelerator.prepare(model, optimizer, scheduler)
    finally:
        for name in hidden:
            delattr(base, name)


def prepare_frozen(
    accelerator: Accelerator, model: torch.nn.Module, micro_batch_size: int, gradient_accumulation_steps: int
) -> torch.nn.Module:
    """A frozen model (DPO's reference) placed for the strategy, without optimizer state or gradient sync.

    Under ZeRO-3 the weights were partitioned as they loaded (zero.Init), so the model needs a DeepSpeed engine of its
    own to gather them in forward (as TRL does); elsewhere it is a plain copy on each process's device.
    """
    model = model.requires_grad_(False).eval()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return model.to(accelerator.device)
    import deepspeed

    def concrete(value):  # accelerate's "auto" placeholders are only filled for the model it prepares
        if isinstance(value, dict):
            return {k: concrete(v) for k, v in value.items() if v != "auto"}
        return value

    config = concrete(plugin.deepspeed_config)
    config.pop("optimizer", None), config.pop("scheduler", None)
    micro, accumulation = micro_batch_size, gradient_accumulation_steps
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * accelerator.num_processes
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeed's eval() returns None
    return engine


@contextlib.contextmanager
def whole_weights(accelerator: Accelerator) -> Iterator[None]:
    """Inside, `from_pretrained` loads whole weights even under ZeRO-3 (which otherwise partitions them as they
    load), for a model that must run before `prepare`: a codec encoding the data. `prepare` partitions it all the
    same. (accelerate's `zero3_init_context_manager(enable=False)` leaves transformers' ZeRO-3 switch on.)"""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # transformers sees the run's ZeRO-3 config again
