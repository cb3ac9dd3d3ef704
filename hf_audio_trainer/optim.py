"""Optimizers and learning-rate schedules, selected by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import pytorch_optimizer
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import get_scheduler

from hf_audio_trainer.errors import ConfigError, check

if TYPE_CHECKING:
    from accelerate import Accelerator

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


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and clipping."""

    optim: str = field(default="adamw", metadata={"help": "Optimizer name (see optim.OPTIMIZERS)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "Decoupled weight decay (not on biases/norms)."})
    adam_beta1: float | None = field(
        default=None,
        metadata={"help": "beta1 (Adam, Lion, Sophia, LAMB; LARS momentum); default: the optimizer's own."},
    )
    adam_beta2: float | None = field(
        default=None, metadata={"help": "beta2; default: the optimizer's own (0.999 Adam-style, 0.99 Lion/Sophia)."}
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 disables."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers SchedulerType name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (overrides warmup_ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of max_steps."})
    lr_timescale: int | None = field(
        default=None,
        metadata={
            "help": "--lr_scheduler_type inverse_sqrt only: after warm-up the rate is learning_rate / sqrt(1 + (step "
            "- warmup) / timescale); unset: transformers' default (the warm-up length, else 10000)."
        },
    )
    sophia_rho: float = field(
        default=0.04, metadata={"help": "Sophia's clipping rho: updates are lr * clip(m / (rho * h), 1)."}
    )
    hessian_update_period: int = field(
        default=10, metadata={"help": "Sophia: refresh the Hessian estimate (one extra pass) every N steps."}
    )
    scale_lr: str | None = field(
        default=None,
        metadata={"help": "linear or sqrt: scale learning_rate by the effective batch / base_batch_size."},
    )
    base_batch_size: int = field(default=16, metadata={"help": "The effective batch learning_rate was tuned for."})

    # settings counted in steps, and the refusal when the user's value does not fit the run (`StageConfig.fit_to_run`)
    run_length: ClassVar[dict[str, str]] = {
        "warmup_steps": "warmup_steps={value} is longer than max_steps={steps}: the learning rate would never leave "
        "warm-up; lower --warmup_steps or use --warmup_ratio"
    }

    def __post_init__(self) -> None:
        from transformers import SchedulerType

        check(self.optim in OPTIMIZERS, f"optim={self.optim!r}: choose one of {sorted(OPTIMIZERS)}")
        # 0 is allowed, as in HF Trainer: the natural check that a pipeline loads and exports a model unchanged
        check(self.learning_rate >= 0, f"learning_rate={self.learning_rate}: must be >= 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            beta = getattr(self, name)
            check(beta is None or 0 <= beta < 1, f"{name}={beta}: must be in [0, 1)")
        check(self.sophia_rho > 0, f"sophia_rho={self.sophia_rho}: must be > 0")
        check(self.hessian_update_period >= 1, f"hessian_update_period={self.hessian_update_period}: must be >= 1")
        check(self.adam_epsilon > 0, f"adam_epsilon={self.adam_epsilon}: must be > 0")
        check(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm}: must be >= 0 (0 disables clipping)")
        names = [s.value for s in SchedulerType]
        check(self.lr_scheduler_type in names, f"lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {names}")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        check(self.lr_timescale is None or self.lr_timescale >= 1, f"lr_timescale={self.lr_timescale}: must be >= 1")
        check(
            self.scale_lr is None or self.scale_lr in LR_SCALING,
            f"scale_lr={self.scale_lr!r}: choose linear, sqrt or none",
        )
        check(self.base_batch_size >= 1, f"base_batch_size={self.base_batch_size}: must be >= 1")


def rescale_learning_rate(optimizer: torch.optim.Optimizer, scheduler, ratio: float) -> None:
    """Scale a running schedule by `ratio`: the base rates it multiplies and the rates in effect now, so it continues
    from where it is at another peak (accelerate's and DeepSpeed's wrappers hold the real ones inside)."""
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio


def build_optimization(
    o: OptimConfig, accelerator: Accelerator, model: torch.nn.Module, global_batch: int, max_steps: int
):
    """Optimizer (with the linear scaling rule if asked) and schedule, from the optim section."""
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
    timescale = {"timescale": o.lr_timescale} if o.lr_scheduler_type == "inverse_sqrt" and o.lr_timescale else {}
    return optimizer, build_scheduler(optimizer, o.lr_scheduler_type, warmup, max_steps, **timescale)
