"""Sophia (with the loop's Hessian pass) and Muon (with AdamW for the rest) against their update rules."""

import pytest
import torch

from hf_audio_trainer.families.musicgen import build_decoder, lm_loss
from hf_audio_trainer.loop import LoopSettings, train
from hf_audio_trainer.optim import (
    GAN_BETAS,
    MuonWithAdamW,
    Sophia,
    build_optimizer,
    build_scheduler,
    hutchinson_hessian,
    parameter_groups,
)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    a = torch.tensor([1.0, 4.0, 0.5])
    x = torch.nn.Parameter(torch.tensor([0.3, -0.2, 1.0]))
    (h,) = hutchinson_hessian(0.5 * (a * x**2).sum(), [x])
    assert torch.allclose(h, a)  # u * (H u) = diag(H) exactly when H is diagonal, as u_i^2 = 1
    m = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    y = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    generator = torch.Generator().manual_seed(0)
    (h,) = hutchinson_hessian(0.5 * y @ m @ y, [y], num_samples=4000, generator=generator)
    assert torch.allclose(h, torch.diagonal(m), atol=0.1)  # the off-diagonal terms average out


def test_hutchinson_refuses_a_loss_without_curvature_information():
    x = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="twice-differentiable"):
        hutchinson_hessian((2 * x).sum(), [x])  # linear: its gradient does not depend on x
    with pytest.raises(ValueError, match="differentiable loss"):
        hutchinson_hessian((2 * x).sum().detach(), [x])


def test_sophia_first_step_is_the_clipped_preconditioned_update():
    # Sophia (Liu et al. 2023): m = (1 - b1) g, h = (1 - b2) h_hat, p <- p(1 - lr wd) - lr clip(m / (rho h), 1)
    lr, rho, wd, (b1, b2) = 0.1, 0.05, 0.2, (0.9, 0.99)
    p0 = torch.tensor([0.5, -1.0, 2.0, 0.1])
    grad = torch.tensor([0.3, -0.2, -4.0, 1e-4])
    h_hat = torch.tensor([1.0, 50.0, 2.0, 3.0])
    param = torch.nn.Parameter(p0.clone())
    optimizer = build_optimizer([param], "sophia", lr=lr, weight_decay=wd, betas=(b1, b2), rho=rho)
    assert isinstance(optimizer, Sophia) and optimizer.hessian_due
    param.grad = grad.clone()
    optimizer.next_hessian = [h_hat]
    optimizer.step()
    ratio = ((1 - b1) * grad) / (rho * (1 - b2) * h_hat)
    expected = p0 * (1 - lr * wd) - lr * ratio.clamp(-1, 1)
    assert torch.allclose(param.detach(), expected, atol=1e-6)
    assert ratio.abs().max() > 1 and ratio.abs().min() < 1  # both the clipped and the unclipped case ran
    assert not optimizer.hessian_due  # the default period is 10


def test_sophia_refuses_to_step_without_its_hessian_estimate():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer([param], "sophia", lr=0.1)
    param.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="needs a Hessian estimate"):
        optimizer.step()


def sophia_batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(16, 4, generator=generator)
        yield {"x": x, "y": torch.sin(x.sum(1, keepdim=True)), "num_items": 16, "num_samples": 16, "audio_seconds": 0}


def mse(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).sum(), {}


def run_loop(accelerator, name, steps=9, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = build_optimizer(model, name, lr=0.01, weight_decay=0.0, **options)
    scheduler = build_scheduler(optimizer, "constant", 0, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    snapshots = []

    def save(step):
        weight = model[0].weight
        state = optimizer.optimizer.state[weight]
        snapshots.append((weight.detach().clone(), state.get("hessian_moment", torch.zeros(())).clone()))

    settings = LoopSettings(max_steps=steps, logging_steps=steps, save_steps=1, max_grad_norm=0)
    train(accelerator, model, optimizer, scheduler, sophia_batches(), mse, settings, save=save)
    return snapshots


def test_the_loop_refreshes_sophias_hessian_every_k_steps_and_it_changes(accelerator):
    snapshots = run_loop(accelerator, "sophia", rho=0.05, hessian_update_period=3)
    moments = [h for _, h in snapshots]  # after steps 1..9; refreshes happen before steps 1, 4 and 7
    for step in (2, 3, 5, 6, 8, 9):
        assert torch.equal(moments[step - 1], moments[step - 2]), step  # no refresh: the moment stays
    for step in (4, 7):
        assert not torch.allclose(moments[step - 1], moments[step - 2]), step  # a new estimate came in
    assert moments[0].abs().min() > 0  # the first pass already gave every coordinate a curvature estimate
    weights = [w for w, _ in snapshots]
    steps = [(b - a).abs().max().item() for a, b in zip(weights[:-1], weights[1:], strict=True)]
    assert max(steps) <= 0.01 + 1e-7  # clipping: no coordinate moves more than lr per step
    adamw = [w for w, _ in run_loop(accelerator, "adamw")]
    assert (weights[-1] - adamw[-1]).abs().max() > 1e-3  # a different trajectory from AdamW's


def tiny_musicgen():
    torch.manual_seed(0)
    return build_decoder(None, "micro", num_codebooks=2, codebook_size=16, max_positions=32, dropout=0.0)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_musicgen()
    optimizer = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.01)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon and all(p.ndim == 2 for g in optimizer.muon.param_groups for p in g["params"])
    assert not any("embed_tokens" in n or "lm_heads" in n for n in muon)
    assert any("lm_heads" in n for n in adamw) and any("embed_tokens" in n for n in adamw)
    assert any("self_attn.q_proj.weight" in n for n in muon) and any("fc1.weight" in n for n in muon)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert muon | adamw == trainable and not muon & adamw
    assert len(optimizer.param_groups) == len(optimizer.muon.param_groups) + len(optimizer.adamw.param_groups)


def musicgen_batch():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 16, (2, 10, 2), generator=generator)
    return {
        "input_ids": torch.randint(0, 16, (4, 10), generator=generator),
        "attention_mask": torch.ones(2, 10, dtype=torch.long),
        "labels": labels,
    }


def test_muon_with_adamw_equals_the_two_torch_optimizers_side_by_side():
    model, reference = tiny_musicgen(), tiny_musicgen()
    optimizer = build_optimizer(model, "muon", lr=1e-2, weight_decay=0.01)
    groups = parameter_groups(reference, 0.01)
    hidden = [g for g in groups if g.get("hidden_matrices")]
    muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([g for g in groups if not g.get("hidden_matrices")], lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        for m, opts in ((model, [optimizer]), (reference, [muon, adamw])):
            lm_loss(m, musicgen_batch())[0].backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        model.state_dict()["model.decoder.layers.0.fc1.weight"],
        tiny_musicgen().state_dict()["model.decoder.layers.0.fc1.weight"],
    )


def test_muon_state_round_trips_and_the_schedule_reaches_both_optimizers():
    def run(resume_after=None):
        model = tiny_musicgen()
        optimizer = build_optimizer(model, "muon", lr=1e-2)
        scheduler = build_scheduler(optimizer, "linear", 0, 6)
        for step in range(6):
            if step == resume_after:  # rebuild everything from the saved state, as a resumed run does
                state = (optimizer.state_dict(), scheduler.state_dict(), model.state_dict())
                model = tiny_musicgen()
                model.load_state_dict(state[2])
                optimizer = build_optimizer(model, "muon", lr=1e-2)
                scheduler = build_scheduler(optimizer, "linear", 0, 6)
                optimizer.load_state_dict(state[0])
                scheduler.load_state_dict(state[1])
            lm_loss(model, musicgen_batch())[0].backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        lrs = [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups]
        return model, lrs

    straight, lrs = run()
    resumed, resumed_lrs = run(resume_after=3)
    assert lrs == resumed_lrs and all(lr == pytest.approx(0.0) for lr in lrs)  # the linear decay reached both
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_muon_needs_matrices():
    with pytest.raises(ValueError, match="no 2-D hidden weight matrices"):
        build_optimizer([torch.nn.Parameter(torch.ones(3))], "muon")


def test_betas_default_to_each_optimizers_own_and_can_be_set_one_at_a_time():
    param = torch.nn.Parameter(torch.ones(2))
    assert build_optimizer([param], "adamw").param_groups[0]["betas"] == (0.9, 0.999)
    assert build_optimizer([param], "lion").param_groups[0]["betas"] == (0.9, 0.99)
    assert build_optimizer([param], "adamw", betas=(None, 0.95)).param_groups[0]["betas"] == (0.9, 0.95)
    assert build_optimizer([param], "adamw", betas=GAN_BETAS).param_groups[0]["betas"] == (0.8, 0.99)
