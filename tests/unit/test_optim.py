import math
from types import SimpleNamespace

import pytest
import torch
from transformers import SchedulerType, get_scheduler

from hf_audio_trainer.families.musicgen import lm_loss
from hf_audio_trainer.optim import build_optimizer, build_scheduler, parameter_groups, scale_lr


def test_scale_lr_rules():
    assert scale_lr(1e-3, 256, 1024, "linear") == pytest.approx(4e-3)
    assert scale_lr(1e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scale_lr(1e-3, 256, 64) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="choose one of"):
        scale_lr(1e-3, 256, 64, "cubic")


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "constant_with_warmup", "inverse_sqrt"])
def test_schedules_equal_transformers_at_every_step(name):
    def lrs(make):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.5)
        scheduler = make(optimizer)
        out = []
        for _ in range(30):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda opt: build_scheduler(opt, name, 5, 30))
    ref = lrs(lambda opt: get_scheduler(SchedulerType(name), opt, num_warmup_steps=5, num_training_steps=30))
    assert ours == ref
    assert ours[0] == 0.0 and ours[5] == pytest.approx(0.5)  # linear warm-up over 5 steps reaches the peak


def test_parameter_groups_leave_biases_norms_and_embeddings_undecayed():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]  # only the Linear weight
    assert len(no_decay["params"]) == 4  # embedding, Linear bias, LayerNorm weight and bias
    optimizer = build_optimizer(model, "adamw", weight_decay=0.01, lr=1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_label_smoothing_matches_the_formula():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # one row, two positions, three classes
    labels = torch.tensor([[0, -100]])  # the second position is masked
    model = lambda input_ids, attention_mask: SimpleNamespace(logits=logits)  # noqa: E731
    batch = {"input_ids": None, "attention_mask": None, "labels": labels}
    log_p = torch.log_softmax(logits[0, 0], -1)
    eps = 0.1
    expected = -(1 - eps) * log_p[0] - eps * log_p.mean()
    loss, _ = lm_loss(model, batch, label_smoothing=eps)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain, _ = lm_loss(model, batch)
    assert plain.item() == pytest.approx(-log_p[0].item(), rel=1e-6)
    assert not math.isclose(loss.item(), plain.item())


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "lion", "lamb", "lars"])
def test_every_optimizer_minimises_a_quadratic(name):
    torch.manual_seed(0)
    target = torch.randn(8, 4)
    weight = torch.nn.Parameter(torch.zeros(8, 4))
    lr = {"lion": 0.01, "adafactor": 0.05}.get(name, 0.05)
    optimizer = build_optimizer([weight], name, lr=lr, weight_decay=0.0)
    start = (weight - target).pow(2).sum().item()
    for _ in range(50):
        loss = (weight - target).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (weight - target).pow(2).sum().item() < 0.5 * start, name


def test_lion_first_step_is_the_signed_update_with_decoupled_decay():
    # Lion (Chen et al. 2023): p <- p - lr * (sign(b1 * m + (1 - b1) * g) + wd * p); with m = 0 that is sign(g)
    p0 = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    grad = torch.tensor([[0.3, -0.2], [-4.0, 0.0001]])
    param = torch.nn.Parameter(p0.clone())
    optimizer = build_optimizer([param], "lion", lr=0.1, weight_decay=0.5, betas=(0.9, 0.99))
    param.grad = grad.clone()
    optimizer.step()
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * torch.sign(grad)
    assert torch.allclose(param.detach(), expected, atol=1e-6)


def test_adam_couples_weight_decay_and_adamw_decouples_it():
    # with a zero gradient, AdamW still shrinks the weight by lr * wd; Adam's L2 term goes through the moments
    results = {}
    for name in ("adam", "adamw"):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = build_optimizer([param], name, lr=0.1, weight_decay=0.1)
        param.grad = torch.zeros(3)
        optimizer.step()
        results[name] = param.detach().clone()
    assert torch.allclose(results["adamw"], torch.full((3,), 1 - 0.1 * 0.1))
    assert torch.allclose(results["adam"], torch.full((3,), 0.9), atol=1e-4)  # a full normalised step of lr


def test_inverse_sqrt_with_a_timescale_is_stable_audio_opens_inverse_lr_after_the_warm_up():
    """--lr_timescale T: after W warm-up steps the rate is lr (1 + (step - W) / T)^-1/2, stable-audio-tools'
    InverseLR shape (its release: T = 1e6); other schedules do not read it."""
    from accelerate import Accelerator

    from hf_audio_trainer.optim import OptimConfig, build_optimization

    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(learning_rate=5e-5, lr_scheduler_type="inverse_sqrt", warmup_steps=10, lr_timescale=1000)
    optimizer, scheduler = build_optimization(cfg, Accelerator(cpu=True), model, 4, 100)
    rates = []
    for _ in range(60):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[5] == pytest.approx(5e-5 * 5 / 10)  # linear warm-up
    for step in (10, 30, 59):
        assert rates[step] == pytest.approx(5e-5 * (1 + (step - 10) / 1000) ** -0.5, rel=1e-9)
    cosine = OptimConfig(lr_scheduler_type="cosine", warmup_steps=10, lr_timescale=1000)
    _, plain = build_optimization(cosine, Accelerator(cpu=True), model, 4, 100)
    assert type(plain.lr_lambdas[0]).__name__ == "partial" and "timescale" not in plain.lr_lambdas[0].keywords
    with pytest.raises(Exception, match="lr_timescale=0: must be >= 1"):
        OptimConfig(lr_timescale=0)
