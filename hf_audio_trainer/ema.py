"""Exponential moving average of model weights, used for evaluation, generation and the exported `ema/` model."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hf_audio_trainer.errors import ConfigError, check


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameter)? Looked up only if loaded: importing the module costs ~1 s."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def reshard(model: torch.nn.Module) -> None:
    """FSDP2 leaves some groups gathered after a forward (the root's): make every parameter its shard again."""
    module = sys.modules.get("torch.distributed.fsdp")  # loaded by accelerate whenever FSDP is in use
    if module is None:
        return
    for part in model.modules():
        if isinstance(part, module.FSDPModule):
            part.reshard()


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds and updates: all of it, or its own shard under FSDP2 / ZeRO-3."""
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's flat partition (param.data is often empty)
        return param.ds_tensor
    if is_dtensor(param):  # FSDP2: this rank's shard, the same storage
        return param.to_local()
    return param


def refresh_gathered(params: list[torch.Tensor]) -> None:
    """After writing ZeRO-3 partitions: drop stale gathered copies, re-gather the ones DeepSpeed keeps whole."""
    gathered = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel() > 0]
    if gathered:
        gathered[0].partition(gathered, has_been_updated=False)  # frees the full copies; partitions stay as written
    persistent = [p for p in params if getattr(p, "ds_persist", False)]  # small parameters live gathered
    if persistent:
        persistent[0].all_gather(persistent)


class EMA:
    """`ema = d * ema + (1 - d) * param` for every trainable parameter, with foreach ops.

    Under FSDP2 or DeepSpeed ZeRO-3 each process averages only its own shard of each parameter (no gather per
    step, 1/N of the memory); `sharded` is then True and `state_dict` holds this rank's shards. Swapping the
    average in (`copy_to`, `average_parameters`) writes the shards, so a consolidated export of the swapped-in
    model (accelerate's `get_state_dict`) is the consolidated average.

    Args:
        decay: the seed's typical 0.999-0.9999.
        update_every: update only every N calls of `update` (the decay is applied once per update).
        start_step: before this step `update` copies the weights instead of averaging (the average of a random
            init is worthless).
        warmup: if True, the decay ramps up as min(decay, (1 + n) / (10 + n)) with n the number of updates
            (off by default, so one update gives exactly `d * ema + (1 - d) * param`).
        power: if set, the decay ramps up as min(decay, 1 - (1 + n) ** -power) instead (diffusers' `EMAModel`
            with inv_gamma 1; Karras et al.'s power schedule).
        device: where the average lives; "cpu" offloads it (the update then costs a copy per update).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.999,
        update_every: int = 1,
        start_step: int = 0,
        warmup: bool = False,
        device: str | torch.device | None = None,
        power: float | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay={decay}: must be in [0, 1)")
        if update_every < 1:
            raise ConfigError(f"EMA update_every={update_every}: must be >= 1")
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.warmup = warmup
        self.power = power
        self.device = device
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = self._params(model)
        self.sharded = any(hasattr(p, "ds_tensor") or is_dtensor(p) for p in params)
        self.shadow = [self._local(p).to(device or self._local(p).device, copy=True).float() for p in params]
        self.num_updates = 0

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        reshard(model)
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        return local_shard(param).detach()

    def current_decay(self) -> float:
        if self.power is not None:  # diffusers' EMAModel (inv_gamma 1): short averages early, long ones later
            return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -self.power)
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the model's weights after optimizer step `step` into the average."""
        if step % self.update_every:
            return
        current = [
            self._local(p).to(s.device, dtype=s.dtype) for p, s in zip(self._params(model), self.shadow, strict=True)
        ]
        if step <= self.start_step:
            torch._foreach_copy_(self.shadow, current)
        else:
            # ema += (1 - d) * (param - ema)  ==  d * ema + (1 - d) * param
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
            self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into the model."""
        params = self._params(model)
        for param, average in zip(params, self.shadow, strict=True):
            target = self._local(param)
            target.copy_(average.to(target.device, dtype=target.dtype))
        refresh_gathered(params)

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the averaged weights in; restore the training weights on exit (even on error)."""
        params = self._params(model)
        backup = [self._local(p).clone() for p in params]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([self._local(p) for p in params], backup)
                refresh_gathered(params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready): the averages by parameter name, and the update count."""
        state = {f"ema.{n}": s.contiguous() for n, s in zip(self.names, self.shadow, strict=True)}
        state["num_updates"] = torch.tensor(self.num_updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"ema.{n}" not in state]
        if missing:
            raise ConfigError(f"the EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}: another model?")
        with torch.no_grad():
            for name, average in zip(self.names, self.shadow, strict=True):
                average.copy_(state[f"ema.{name}"])
        self.num_updates = int(state["num_updates"])


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for evaluation and exported as `ema/`."""

    ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay (typically 0.999-0.9999)."})
    ema_update_every: int = field(default=1, metadata={"help": "Update the EMA every N optimizer steps."})
    ema_start_step: int = field(default=0, metadata={"help": "Until this step the EMA copies the weights."})
    ema_warmup: bool = field(default=False, metadata={"help": "Ramp the decay up as (1 + n) / (10 + n)."})
    ema_power: float | None = field(
        default=None,
        metadata={
            "help": "Ramp the decay up as 1 - (1 + n)^-power, capped at --ema_decay (diffusers' EMAModel and "
            "Karras et al.'s power schedule: 2/3 for long runs, 3/4 for short ones)."
        },
    )
    ema_offload: bool = field(default=False, metadata={"help": "Keep the EMA on the CPU (saves GPU memory)."})
    final_model: str = field(
        default="raw", metadata={"help": "Which weights the output folder holds: raw or ema (the other: ema/)."}
    )

    def __post_init__(self) -> None:
        check(0.0 < self.ema_decay < 1.0, f"ema_decay={self.ema_decay}: must be in (0, 1), typically 0.999-0.9999")
        check(self.ema_update_every >= 1, f"ema_update_every={self.ema_update_every}: must be >= 1")
        check(self.ema_start_step >= 0, f"ema_start_step={self.ema_start_step}: must be >= 0")
        check(self.final_model in ("raw", "ema"), f"final_model={self.final_model!r}: choose raw or ema")
        check(self.ema_power is None or self.ema_power > 0, f"ema_power={self.ema_power}: must be > 0")
        check(
            self.ema_power is None or not self.ema_warmup,
            "--ema_warmup and --ema_power are two warm-up schedules; choose one",
        )
        check(self.ema or self.final_model == "raw", "final_model=ema needs --ema")


def build_ema(e: EMAConfig, model: torch.nn.Module) -> EMA | None:
    """The EMA the ema section asks for, of `model`'s weights; None without --ema."""
    if not e.ema:
        return None
    device = "cpu" if e.ema_offload else None
    return EMA(model, e.ema_decay, e.ema_update_every, e.ema_start_step, e.ema_warmup, device=device, power=e.ema_power)
