"""The DPO-family losses against the formulas computed by hand with math, and their validation."""

import math

import numpy as np
import pytest
import torch

from hf_audio_trainer.alignment import LOSS_TYPES, dpo_loss

BETA = 0.1


def _logsigmoid(x: float) -> float:
    return math.log(1 / (1 + math.exp(-x)))


def _inputs(seed: int = 0, n: int = 6) -> list[torch.Tensor]:
    """Summed log-probs of a few examples, policy near reference: at beta 0.1, beta * logits spans about +-3."""
    rng = np.random.default_rng(seed)
    reference = rng.uniform(-80, -20, size=(2, n))
    policy = reference + rng.normal(0, 20, size=(2, n))
    return [torch.tensor(x, dtype=torch.float32) for x in (policy[0], policy[1], reference[0], reference[1])]


def _logits(pc, pr, rc, rr) -> list[float]:
    return [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)]


def _by_hand(loss_type: str, z: float, beta: float, eps: float) -> float:
    if loss_type == "sigmoid":
        return -_logsigmoid(beta * z) * (1 - eps) - _logsigmoid(-beta * z) * eps
    if loss_type == "robust":
        return (-_logsigmoid(beta * z) * (1 - eps) + _logsigmoid(-beta * z) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * z)
    return (z - 1 / (2 * beta)) ** 2


def test_loss_types_are_the_four_trl_losses():
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "hinge", "ipo"}


@pytest.mark.parametrize(
    "loss_type, beta, eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.1, 0.0), ("robust", 0.1, 0.3), ("hinge", 0.1, 0.0)]
    + [("hinge", 2.0, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)],
)
def test_losses_match_the_formulas_by_hand(loss_type, beta, eps):
    inputs = _inputs(seed=4)  # margins on both sides of the hinge
    losses, _, _ = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected = [_by_hand(loss_type, z, beta, eps) for z in _logits(*inputs)]
    assert losses.shape == (6,) and losses.dtype == torch.float32
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5, atol=1e-5)
    if loss_type == "hinge":
        assert (losses == 0).any() and (losses > 0).any(), "the inputs should reach both sides of the hinge"


def test_sigmoid_without_smoothing_is_minus_log_sigmoid():
    inputs = _inputs(seed=3)
    losses, _, _ = dpo_loss(*inputs, beta=BETA)
    expected = [-math.log(1 / (1 + math.exp(-BETA * z))) for z in _logits(*inputs)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)


def test_values_at_zero_margin():
    same = torch.full((2,), -7.0)
    assert dpo_loss(same, same, same, same, beta=BETA)[0].tolist() == pytest.approx([math.log(2)] * 2)
    assert dpo_loss(same, same, same, same, beta=BETA, loss_type="hinge")[0].tolist() == [1.0, 1.0]
    # IPO's target margin is 1 / (2 beta) = 5: at margin 0 the loss is 25, at margin 5 it is 0.
    assert dpo_loss(same, same, same, same, beta=BETA, loss_type="ipo")[0].tolist() == pytest.approx([25.0] * 2)
    at_target = dpo_loss(same + 5, same, same, same, beta=BETA, loss_type="ipo")[0]
    assert at_target.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_robust_loss_is_unbiased_under_label_flips():
    """Averaged over labels flipped with probability eps, robust DPO gives the clean DPO loss."""
    pc, pr, rc, rr = _inputs(seed=4)
    eps = 0.2
    kept = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="robust", label_smoothing=eps)[0]
    flipped = dpo_loss(pr, pc, rr, rc, beta=BETA, loss_type="robust", label_smoothing=eps)[0]
    clean = [-_logsigmoid(BETA * z) for z in _logits(pc, pr, rc, rr)]
    np.testing.assert_allclose(((1 - eps) * kept + eps * flipped).numpy(), clean, rtol=1e-5)


def test_rewards_are_beta_times_policy_minus_reference_without_gradient():
    pc, pr, rc, rr = _inputs(seed=5)
    pc.requires_grad_(True)
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.25)
    expected_chosen = [0.25 * (a - b) for a, b in zip(pc.tolist(), rc.tolist(), strict=True)]
    expected_rejected = [0.25 * (a - b) for a, b in zip(pr.tolist(), rr.tolist(), strict=True)]
    np.testing.assert_allclose(chosen.numpy(), expected_chosen, rtol=1e-5)
    np.testing.assert_allclose(rejected.numpy(), expected_rejected, rtol=1e-5)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _inputs(seed=6)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    losses.sum().backward()
    # Descending the loss raises the chosen log-prob and lowers the rejected one.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    higher, _, _ = dpo_loss(pc.detach() + 1.0, pr.detach(), rc, rr, beta=BETA)
    assert (higher < losses.detach()).all()


def test_bf16_inputs_give_float32_math():
    pc, pr, rc, rr = (t.to(torch.bfloat16) for t in _inputs(seed=7))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32
    expected = [-_logsigmoid(BETA * z) for z in _logits(pc.float(), pr.float(), rc.float(), rr.float())]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kto"}, r"unknown loss_type 'kto'; choose one of \['sigmoid', 'robust', 'hinge', 'ipo'\]"),
        ({"beta": 0.0}, "beta must be > 0, got 0.0"),
        ({"beta": -0.1}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\), got 0.5"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, r"only applies to \['sigmoid', 'robust'\]"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, r"only applies to \['sigmoid', 'robust'\]"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(*_inputs(), **kwargs)


def test_mismatched_or_non_1d_shapes_raise():
    pc, pr, rc, rr = _inputs()
    with pytest.raises(ValueError, match=r"same shape .* got shapes \[\(6,\), \(5,\), \(6,\), \(6,\)\]"):
        dpo_loss(pc, pr[:5], rc, rr)
    with pytest.raises(ValueError, match="1-D tensors"):
        dpo_loss(*(t.view(2, 3) for t in (pc, pr, rc, rr)))
