"""Optimizers and learning-rate schedules, selected by name."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler


def _adafactor(params, lr, betas, eps, weight_decay):
    from transformers.optimization import Adafactor

    # an external learning rate and schedule, like every other optimizer here (not Adafactor's relative steps)
    return Adafactor(params, lr=lr, beta1=None, weight_decay=weight_decay, scale_parameter=False, relative_step=False)


def _pytorch_optimizer(name: str):
    def build(params, lr, betas, eps, weight_decay):
        import pytorch_optimizer

        if name == "Lion":  # sign updates: no eps
            return pytorch_optimizer.Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)
        if name == "LARS":  # SGD with layer-wise trust ratios: beta1 is its momentum
            return pytorch_optimizer.LARS(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
        return getattr(pytorch_optimizer, name)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    return build


# name -> factory(param_groups, lr, betas, eps, weight_decay); weight decay is decoupled except for plain Adam.
# Lion, LAMB and LARS come from pytorch-optimizer, a maintained collection, rather than being rewritten here.
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
}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales and embeddings are left alone (decaying them hurts)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model_or_params,
    name: str = "adamw",
    weight_decay: float = 0.0,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An optimizer by name over a model (with decay/no-decay groups) or an iterable of parameters/groups."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if isinstance(model_or_params, torch.nn.Module):
        params = parameter_groups(model_or_params, weight_decay)
    else:
        params = list(model_or_params)
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


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
        raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {sorted(LR_SCALING)}")
    if base_batch_size < 1 or batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {base_batch_size} and {batch_size}")
    return base_lr * LR_SCALING[rule](batch_size / base_batch_size)
