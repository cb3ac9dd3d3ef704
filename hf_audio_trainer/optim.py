"""Optimizers and learning-rate schedules, selected by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytorch_optimizer
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import get_scheduler

from hf_audio_trainer.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hf_audio_trainer.config import StageConfig

# Adam-style betas when --adam_beta1/--adam_beta2 are not given: each optimizer's paper default. GAN_BETAS are the
# usual ones for adversarial training (HiFi-GAN, EnCodec, DAC), where a short memory keeps up with the opponent.
DEFAULT_BETAS = {"lion": (0.9, 0.99), "sophia": (0.965, 0.99)}
ADAM_BETAS = (0.9, 0.999)
GAN_BETAS = (0.8, 0.99)


def _adafactor(params, lr, betas, eps, weight_decay):
    from transformers.optimization import Adafactor

    # an external learning rate and schedule, like every other optimizer here (not Adafactor's relative steps)
    return Adafactor(params, lr=lr, beta1=None, weight_decay=weight_decay, scale_parameter=False, relative_step=False)


def _pytorch_optimizer(name: str):
    def build(params, lr, betas, eps, weight_decay):
        if name == "Lion":  # sign updates: no eps
            return pytorch_optimizer.Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)
        if name == "LARS":  # SGD with layer-wise trust ratios: beta1 is its momentum
            return pytorch_optimizer.LARS(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
        return getattr(pytorch_optimizer, name)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    return build


class Sophia(pytorch_optimizer.SophiaH):
    """Sophia (Liu et al. 2023) with a Hutchinson estimate of the Hessian diagonal that the training loop supplies.

    Update: m <- b1 m + (1 - b1) g; every `hessian_update_period` steps h <- b2 h + (1 - b2) h_hat; then
    p <- p (1 - lr wd) - lr * clip(m / max(rho * h, eps), 1): the paper's form, in which no coordinate moves more
    than lr per step, and lr is what the schedule sets and the logs show. pytorch-optimizer's SophiaH computes the
    same with lr / rho, weight decay * rho and a clip at rho, which `step` passes it.

    SophiaH would estimate the Hessian from `loss.backward(create_graph=True)`, which breaks gradient clipping,
    accumulation and DDP (all of them modify or reduce .grad). Instead the loop hands `prepare_step` a closure that
    computes one micro-batch's mean loss with its graph; when the refresh is due, Sophia runs the extra
    double-backward (`hutchinson_hessian`), averages it over processes and keeps it as `next_hessian`.
    """

    def __init__(self, params, lr, betas, weight_decay, rho: float = 0.04, hessian_update_period: int = 10):
        if rho <= 0:
            raise ConfigError(f"sophia rho={rho}: must be > 0")
        if hessian_update_period < 1:
            raise ConfigError(f"hessian_update_period={hessian_update_period}: must be >= 1")
        # SophiaH's own refresh would only trigger on its step 1, where `next_hessian` is always set
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, p=rho, update_period=2**62)
        self.hessian_update_period = hessian_update_period
        self.next_hessian: list[torch.Tensor] | None = None

    @property
    def hessian_due(self) -> bool:
        """Whether the coming step refreshes the Hessian estimate (steps 0, k, 2k ... as counted by the state)."""
        return self.param_groups[0].get("step", 0) % self.hessian_update_period == 0

    def prepare_step(self, loss_closure: Callable[[], torch.Tensor]) -> None:
        """Before a step: if its Hessian refresh is due, estimate diag(H) of `loss_closure()` (one extra forward and
        double-backward), the same on every process (their mean)."""
        if not self.hessian_due:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        hessian = hutchinson_hessian(loss_closure(), params)
        self.next_hessian = reduce(hessian, "mean") if PartialState().num_processes > 1 else hessian

    @torch.no_grad()
    def step(self, closure=None):
        hessian, self.next_hessian = self.next_hessian, None
        if hessian is None and self.hessian_due:
            raise RuntimeError(
                "Sophia needs a Hessian estimate on this step: train with hf_audio_trainer.loop.train, which calls "
                "prepare_step before every step, or set optimizer.next_hessian = hutchinson_hessian(...)"
            )
        if hessian is not None:  # a rare non-finite estimate (fp16 overflow) must not poison the running average
            hessian = [torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0) for h in hessian]
        kept = [(g["lr"], g["weight_decay"]) for g in self.param_groups]
        for group in self.param_groups:  # to SophiaH's parametrisation for this one step
            group["lr"], group["weight_decay"] = group["lr"] / group["p"], group["weight_decay"] * group["p"]
        try:
            return super().step(closure, hessian=hessian)
        finally:
            for group, (lr, weight_decay) in zip(self.param_groups, kept, strict=True):
                group["lr"], group["weight_decay"] = lr, weight_decay


def hutchinson_hessian(
    loss: torch.Tensor, params: list[torch.Tensor], num_samples: int = 1, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Unbiased estimate of diag(H) of `loss`: the mean over Rademacher u of u * (H u), one per parameter.

    Needs the graph of `loss` (it differentiates twice); parameters that do not affect the loss get zeros.
    """
    if not loss.requires_grad:
        raise ConfigError("Sophia needs a differentiable loss: the loss does not require grad")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not used:
        raise ConfigError(
            "Sophia needs a twice-differentiable loss: its gradient does not depend on the parameters "
            "(a piecewise-linear loss or a detached computation); use another --optim"
        )
    estimate = [torch.zeros_like(p) for p in params]
    for sample in range(num_samples):
        probes = [
            torch.randint(0, 2, params[i].shape, generator=generator, device=params[i].device).to(params[i].dtype) * 2
            - 1
            for i in used
        ]
        hvps = torch.autograd.grad(
            [grads[i] for i in used],
            [params[i] for i in used],
            grad_outputs=probes,
            retain_graph=sample < num_samples - 1,
            allow_unused=True,
        )
        for i, u, hvp in zip(used, probes, hvps, strict=True):
            if hvp is not None:
                estimate[i].add_(u * hvp.detach(), alpha=1.0 / num_samples)
    return estimate


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the 2-D hidden weight matrices, AdamW on the rest, behaving as one optimizer.

    Muon (Jordan et al. 2024) orthogonalises the momentum of each matrix; embeddings, output heads, biases and
    norms are not hidden matrices and take AdamW. Muon's lr is matched to AdamW's update RMS
    (`adjust_lr_fn="match_rms_adamw"`, Liu et al. 2025), so one learning rate and schedule drive both. The two
    inner optimizers share their parameter-group dicts with this one, so schedulers and accelerate's GradScaler
    (which set and read `param_groups`) see every group.
    """

    def __init__(self, muon_groups, adamw_groups, lr, betas, eps, weight_decay, momentum: float = 0.95):
        self.muon = torch.optim.Muon(
            muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_groups or [], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # loading made new group dicts


def _muon(groups, lr, betas, eps, weight_decay, momentum: float = 0.95):
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optim muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    if groups and not isinstance(groups[0], dict):  # a plain list of parameters
        groups = [{"params": groups}]
    marked = any("hidden_matrices" in g for g in groups)
    muon_groups, adamw_groups = [], []
    for group in groups:
        if marked:
            (muon_groups if group.get("hidden_matrices") else adamw_groups).append(group)
            continue
        matrices = [p for p in group["params"] if p.ndim == 2]
        others = [p for p in group["params"] if p.ndim != 2]
        muon_groups += [{**group, "params": matrices}] if matrices else []
        adamw_groups += [{**group, "params": others}] if others else []
    if not muon_groups:
        raise ConfigError("--optim muon found no 2-D hidden weight matrices to orthogonalise; use adamw for this model")
    return MuonWithAdamW(
        muon_groups, adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum
    )


def _sophia(groups, lr, betas, eps, weight_decay, rho: float = 0.04, hessian_update_period: int = 10):
    return Sophia(
        groups, lr=lr, betas=betas, weight_decay=weight_decay, rho=rho, hessian_update_period=hessian_update_period
    )


# name -> factory(param_groups, lr, betas, eps, weight_decay, **options); weight decay is decoupled except for
# plain Adam. Lion, LAMB, LARS and SophiaH come from pytorch-optimizer, a maintained collection, and Muon from
# torch, rather than being rewritten here.
OPTIMIZERS = {
    "adamw": lambda params, lr, betas, eps, weight_decay: torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    ),
    "adam": lambda params, lr, betas, eps, weight_decay: torch.optim.Adam(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    ),
    "adafactor": _adafactor,
    "lion": _pytorch_optimizer("Lion"),
    "lamb": _pytorch_optimizer("Lamb"),
    "lars": _pytorch_optimizer("LARS"),
    "sophia": _sophia,
    "muon": _muon,
}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales and embeddings are left alone (decaying them hurts).

    The decayed hidden matrices (not the output heads) are marked `hidden_matrices`, for Muon; empty groups are
    dropped.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    heads = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in heads.parameters()} if heads is not None else set()
    hidden, other, no_decay = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            (other if id(param) in head_params or param.ndim != 2 else hidden).append(param)
    groups = [
        {"params": hidden, "weight_decay": weight_decay, "hidden_matrices": True},
        {"params": other, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model_or_params,
    name: str = "adamw",
    weight_decay: float = 0.0,
    lr: float = 1e-3,
    betas: tuple[float | None, float | None] | None = None,
    eps: float = 1e-8,
    **options,
) -> torch.optim.Optimizer:
    """An optimizer by name over a model (with decay/no-decay groups) or an iterable of parameters/groups.

    A beta left None takes the optimizer's own default (DEFAULT_BETAS, else ADAM_BETAS); `options` go to the factory
    (sophia: rho, hessian_update_period; muon: momentum).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if isinstance(model_or_params, torch.nn.Module):
        params = parameter_groups(model_or_params, weight_decay)
    else:
        params = list(model_or_params)
    defaults = DEFAULT_BETAS.get(name, ADAM_BETAS)
    betas = tuple(d if b is None else b for b, d in zip(betas or (None, None), defaults, strict=True))
    return OPTIMIZERS[name](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, num_warmup_steps: int, num_training_steps: int, **kwargs
) -> torch.optim.lr_scheduler.LRScheduler:
    """Any transformers SchedulerType by name (e.g. cosine = linear warm-up then cosine decay)."""
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


# rule -> lr multiplier for a batch `ratio` times the one the lr was tuned for (Goyal et al. 2017 for linear;
# square root for adaptive optimizers, Malladi et al. 2022)
LR_SCALING = {"linear": lambda ratio: ratio, "sqrt": math.sqrt}


def scale_lr(base_lr: float, base_batch_size: int, batch_size: int, rule: str = "linear") -> float:
    """The learning rate for `batch_size`, given one tuned for `base_batch_size` (the linear scaling rule)."""
    if rule not in LR_SCALING:
        raise ConfigError(f"unknown lr scaling rule {rule!r}; choose one of {sorted(LR_SCALING)}")
    if base_batch_size < 1 or batch_size < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {base_batch_size} and {batch_size}")
    return base_lr * LR_SCALING[rule](batch_size / base_batch_size)


def build_optimization(
    cfg: StageConfig, accelerator: Accelerator, model: torch.nn.Module, global_batch: int, max_steps: int
):
    """Optimizer (with the linear scaling rule if asked) and schedule, from the config's optim section."""
    o = cfg.optim
    lr = o.learning_rate
    if o.scale_lr is not None:
        lr = scale_lr(o.learning_rate, o.base_batch_size, global_batch, o.scale_lr)
        accelerator.print(
            f"--scale_lr {o.scale_lr}: learning rate {o.learning_rate:g} tuned for a batch of {o.base_batch_size} "
            f"-> {lr:g} for the effective batch of {global_batch}"
        )
    optimizer = build_optimizer(
        model,
        o.optim,
        weight_decay=o.weight_decay,
        lr=lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        **({"rho": o.sophia_rho, "hessian_update_period": o.hessian_update_period} if o.optim == "sophia" else {}),
    )
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * max_steps)
    return optimizer, build_scheduler(optimizer, o.lr_scheduler_type, warmup, max_steps)
