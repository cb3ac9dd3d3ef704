import pytest
import torch

from hf_audio_trainer.ema import EMA


def model_with(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def set_all(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_matches_the_closed_form_average():
    d = 0.9
    model = model_with(1.0)
    ema = EMA(model, decay=d)
    values = [2.0, 5.0, -1.0, 3.0]
    for step, v in enumerate(values, start=1):
        set_all(model, v)
        ema.update(model, step)
    # ema_k = d^k * p0 + sum_i (1 - d) d^(k - i) p_i
    expected = d**4 * 1.0 + sum((1 - d) * d ** (4 - i) * v for i, v in enumerate(values, start=1))
    for average in ema.shadow:
        assert torch.allclose(average, torch.full_like(average, expected), atol=1e-6)
    assert ema.num_updates == 4


def test_one_update_is_exactly_d_ema_plus_one_minus_d_param():
    model = model_with(0.0)
    ema = EMA(model, decay=0.999)
    set_all(model, 1.0)
    ema.update(model, 1)
    assert all(torch.allclose(s, torch.full_like(s, 0.001)) for s in ema.shadow)


def test_update_every_start_step_and_warmup():
    model = model_with(0.0)
    ema = EMA(model, decay=0.5, update_every=2, start_step=2)
    set_all(model, 4.0)
    ema.update(model, 1)  # not a multiple of 2: ignored
    assert all(torch.equal(s, torch.zeros_like(s)) for s in ema.shadow)
    ema.update(model, 2)  # at start_step: a copy
    assert all(torch.equal(s, torch.full_like(s, 4.0)) for s in ema.shadow)
    set_all(model, 0.0)
    ema.update(model, 4)
    assert all(torch.allclose(s, torch.full_like(s, 2.0)) for s in ema.shadow)
    warm = EMA(model_with(0.0), decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_average_parameters_swaps_in_and_restores_even_on_error():
    model = model_with(1.0)
    ema = EMA(model, decay=0.5)
    set_all(model, 3.0)
    ema.update(model, 1)  # average 2.0
    with pytest.raises(RuntimeError), ema.average_parameters(model):
        assert all(torch.allclose(p, torch.full_like(p, 2.0)) for p in model.parameters())
        raise RuntimeError("boom")
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())


def test_state_round_trip_and_cpu_offload():
    model = model_with(1.0)
    ema = EMA(model, decay=0.8, device="cpu")
    set_all(model, 2.0)
    ema.update(model, 1)
    other = EMA(model_with(0.0), decay=0.8, device="cpu")
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow, strict=True))
    with pytest.raises(ValueError, match="lacks"):
        EMA(torch.nn.Linear(4, 4)).load_state_dict({"num_updates": torch.tensor(0)})


def test_frozen_parameters_are_not_averaged():
    model = model_with(1.0)
    model.bias.requires_grad_(False)
    assert EMA(model).names == ["weight"]


def test_bad_settings():
    with pytest.raises(ValueError, match="decay=1.0"):
        EMA(model_with(0.0), decay=1.0)
    with pytest.raises(ValueError, match="update_every=0"):
        EMA(model_with(0.0), update_every=0)


def test_power_schedule_matches_diffusers_ema_model():
    """--ema_power: the same averages as diffusers' EMAModel (use_ema_warmup, inv_gamma 1), capped at the decay."""
    from diffusers.training_utils import EMAModel

    model = model_with(0.0)
    ours = EMA(model, decay=0.99, power=0.75)
    theirs = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=0.75, min_decay=0.0)
    for step, value in enumerate([1.0, 4.0, -2.0, 3.0, 0.5, 7.0], start=1):
        set_all(model, value)
        ours.update(model, step)
        theirs.step(model.parameters())
        for mine, reference in zip(ours.shadow, theirs.shadow_params, strict=True):
            assert torch.allclose(mine, reference.float(), rtol=1e-6, atol=1e-7)
    # the first update copies (decay 0), later ones ramp up as 1 - (1 + n)^-0.75
    assert ours.num_updates == 6 and ours.current_decay() == pytest.approx(1 - 7**-0.75)
