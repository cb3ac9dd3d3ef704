"""Preference alignment: the DPO family of losses on per-example sequence log-probabilities.

The losses follow TRL's ``DPOTrainer.dpo_loss``. Each takes the margin by which the policy prefers the chosen
continuation over the rejected one, relative to the frozen reference model::

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)

and returns one loss per example; the caller reduces (usually a mean over the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); label smoothing gives conservative DPO (cDPO), for labels flipped with rate eps."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): an unbiased estimate of the clean-label loss under label noise eps."""
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing) + F.logsigmoid(-beta * logits) * label_smoothing) / (
        1 - 2 * label_smoothing
    )


def _hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC's hinge loss (Zhao et al. 2023): zero once the margin beta * logits reaches 1."""
    return torch.relu(1 - beta * logits)


def _ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the margin onto 1 / (2 beta) instead of pushing it to infinity."""
    return (logits - 1 / (2 * beta)) ** 2


LOSS_TYPES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo}
# Label smoothing models noisy preference labels; only these losses have a term for it.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and the implicit rewards of the chosen and rejected continuations.

    Args:
        policy_chosen_logps: 1-D ``(batch,)`` summed log-probabilities of the chosen continuations under the
            policy; the other three are the same for the rejected continuations and the reference model. For
            ``ipo`` pass length-averaged log-probabilities (sum divided by the number of tokens), as the IPO paper
            and TRL do: its target margin 1 / (2 beta) does not scale with sequence length.
        beta: strength of the KL penalty to the reference model (smaller lets the policy drift further).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: assumed rate of flipped preference labels, in [0, 0.5); ``sigmoid`` and ``robust`` only.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each float32 ``(batch,)``; the rewards are
        ``beta * (policy - reference)`` and carry no gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}: it only applies to "
            f"{list(SMOOTHED_LOSS_TYPES)}; set it to 0"
        )
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shapes = [tuple(t.shape) for t in logps]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, reference_chosen and reference_rejected log-probabilities must be "
            f"1-D tensors of the same shape (one value per example), got shapes {shapes}"
        )
    # bf16 has ~3 significant digits: the difference of two summed log-probs of a long sequence would be noise.
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (t.float() for t in logps)
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = LOSS_TYPES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards
