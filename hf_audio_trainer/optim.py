"""Optimizers and learning-rate schedules, selected by name."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

# name -> optimizer class taking (param_groups, lr=..., betas=..., eps=..., weight_decay=...)
OPTIMIZERS = {"adamw": torch.optim.AdamW}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales and embeddings are left alone (decaying them hurts)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_or_params, name: str = "adamw", weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """An optimizer by name over a model (with decay/no-decay groups) or an iterable of parameters/groups."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if isinstance(model_or_params, torch.nn.Module):
        params = parameter_groups(model_or_params, weight_decay)
    else:
        params = list(model_or_params)
        kwargs["weight_decay"] = weight_decay
    return OPTIMIZERS[name](params, **kwargs)


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
