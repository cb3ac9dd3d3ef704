"""Exponential moving average of model weights, used for evaluation, generation and the exported `ema/` model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """`ema = d * ema + (1 - d) * param` for every trainable parameter, with foreach ops.

    Args:
        decay: the seed's typical 0.999-0.9999.
        update_every: update only every N calls of `update` (the decay is applied once per update).
        start_step: before this step `update` copies the weights instead of averaging (the average of a random
            init is worthless).
        warmup: if True, the decay ramps up as min(decay, (1 + n) / (10 + n)) with n the number of updates
            (off by default, so one update gives exactly `d * ema + (1 - d) * param`).
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
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}: must be in [0, 1)")
        if update_every < 1:
            raise ValueError(f"EMA update_every={update_every}: must be >= 1")
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.warmup = warmup
        self.device = device
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().to(device or params[n].device, copy=True).float() for n in self.names]
        self.num_updates = 0

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the model's weights after optimizer step `step` into the average."""
        if step % self.update_every:
            return
        current = [
            p.detach().to(s.device, dtype=s.dtype) for p, s in zip(self._params(model), self.shadow, strict=True)
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
        for param, average in zip(self._params(model), self.shadow, strict=True):
            param.copy_(average.to(param.device, dtype=param.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the averaged weights in; restore the training weights on exit (even on error)."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready): the averages by parameter name, and the update count."""
        state = {f"ema.{n}": s.contiguous() for n, s in zip(self.names, self.shadow, strict=True)}
        state["num_updates"] = torch.tensor(self.num_updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"ema.{n}" not in state]
        if missing:
            raise ValueError(f"the EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}: another model?")
        with torch.no_grad():
            for name, average in zip(self.names, self.shadow, strict=True):
                average.copy_(state[f"ema.{name}"])
        self.num_updates = int(state["num_updates"])
