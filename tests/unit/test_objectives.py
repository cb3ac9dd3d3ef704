"""The diffusion objectives: rectified flow as the flow family has always computed it, and Stable Audio Open's
v-objective over the cosine schedule, which is the model diffusers' CosineDPMSolverMultistepScheduler samples:
checked at random noise levels against the scheduler's own functions."""

import math

import pytest
import torch

from hf_audio_trainer.objectives import (
    cosine_sigma,
    cosine_time,
    rectified_flow,
    rectified_flow_unit,
    sd3_times,
    uniform_times,
    v_cosine,
)

# Stable Audio Open 1.0's scheduler config (scheduler/scheduler_config.json)
SAO_SCHEDULER = dict(
    sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", prediction_type="v_prediction",
    solver_order=2, solver_type="midpoint", final_sigmas_type="zero", num_train_timesteps=1000, rho=7.0,
)  # fmt: skip


def scheduler():
    from diffusers import CosineDPMSolverMultistepScheduler

    return CosineDPMSolverMultistepScheduler(**SAO_SCHEDULER)


def draws(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = (
        torch.randn(n, 4, 7, generator=g, dtype=torch.float64),
        torch.randn(n, 4, 7, generator=g, dtype=torch.float64),
    )
    # noise levels over the scheduler's whole range, log-uniform between sigma_min and sigma_max
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.3), math.log(500.0), generator=g))
    return x0, noise, sigma


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_v_cosine_is_the_cosine_dpm_schedulers_model_at_random_sigmas():
    """t = 2/pi atan(sigma) is `precondition_noise`; x_t is `precondition_inputs` of x0 + sigma e; the v target, read
    back through `precondition_outputs` (and the solver's own `convert_model_output`), is x0."""
    sched = scheduler()
    x0, noise, sigma = draws()
    t = cosine_time(sigma)
    x_t, time, v = v_cosine(x0, noise, t)
    sample = x0 + sigma[:, None, None] * noise  # what the scheduler's sampler holds at noise level sigma
    errors = {
        "t": relative(t, sched.precondition_noise(sigma)),
        "time read by the DiT": relative(time, t),
        "x_t": relative(x_t, sched.precondition_inputs(sample, sigma[:, None, None])),
        "x0 from v": relative(sched.precondition_outputs(sample, v, sigma[:, None, None]), x0),
        "sigma of t": relative(cosine_sigma(t), sigma),
    }
    assert max(errors.values()) < 1e-10, errors
    print(f"identity errors (relative, float64): {errors}")


def test_v_cosine_matches_the_scheduler_at_its_own_sampling_steps():
    """Through the sampler's calls: `scale_model_input` at each of its timesteps gives x_t, and the step's
    `convert_model_output` of the v target gives x0 (float32, as sampling runs)."""
    sched = scheduler()
    sched.set_timesteps(12)
    x0, noise, _ = (d.float() for d in draws(n=3))
    worst = 0.0
    for i, timestep in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        sample = x0 + sigma * noise
        x_t, time, v = v_cosine(x0, noise, timestep.expand(3))
        worst = max(worst, relative(sched.scale_model_input(sample, timestep), x_t))
        assert torch.allclose(time, timestep.expand(3))
        worst = max(worst, relative(sched.convert_model_output(v, sample=sample), x0))
        sched._step_index += 1  # what `step` does after converting
    assert worst < 1e-5, worst


def test_rectified_flow_is_the_flow_familys_interpolation_and_velocity():
    x0, noise, _ = draws(n=5)
    s = torch.rand(5, dtype=torch.float64)
    x_t, time, target = rectified_flow(x0, noise, s)
    assert torch.equal(x_t, (1 - s[:, None, None]) * x0 + s[:, None, None] * noise)
    assert torch.equal(time, s * 1000) and torch.equal(target, noise - x0)


def test_v_cosine_ends_pure_data_and_pure_noise():
    x0, noise, _ = draws(n=2)
    x_t, _, v = v_cosine(x0, noise, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(v[0], noise[0])  # t = 0: the data, v = e
    assert torch.allclose(x_t[1], noise[1]) and torch.allclose(v[1], -x0[1])  # t = 1: the noise, v = -x0


def test_time_densities_draw_from_the_generator_alone():
    a = [uniform_times(torch.Generator().manual_seed(s)).item() for s in range(2000)]
    assert a == [uniform_times(torch.Generator().manual_seed(s)).item() for s in range(2000)]
    assert 0 <= min(a) and max(a) < 1 and abs(sum(a) / len(a) - 0.5) < 0.02
    assert abs(sorted(a)[len(a) // 4] - 0.25) < 0.03  # uniform, not bunched like the logit-normal
    logit = sd3_times("logit_normal", 0.0, 1.0, 1.29)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert logit(g1).item() == pytest.approx(logit(g2).item(), abs=0)


def test_rectified_flow_unit_is_what_ace_steps_scheduler_integrates():
    """ACE-Step's pipeline: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1) on its shifted sigmas hands the
    DiT t itself, and its Euler steps move x_t along the velocity. The objective's x_t and target are rectified flow's
    (time t, not 1000 t); one scheduler step from any t with the true velocity lands on the path at the next t, and
    the last lands on x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, noise, _ = draws(8)
    t = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, flow = rectified_flow_unit(x0, noise, t), rectified_flow(x0, noise, t)
    assert torch.equal(ours.x_t, flow.x_t) and torch.equal(ours.target, flow.target) and torch.equal(ours.time, t)
    schedule = [1.0, 0.9, 0.6, 0.25]  # any decreasing sigmas, as the pipeline's shifted schedule passes them
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    sched.set_timesteps(sigmas=schedule)
    assert torch.allclose(sched.timesteps.double(), torch.tensor(schedule, dtype=torch.float64))  # t reaches the DiT
    x = rectified_flow_unit(x0, noise, torch.ones(8, dtype=torch.float64)).x_t
    for i, step in enumerate(sched.timesteps):
        here = torch.full((8,), float(step), dtype=torch.float64)
        x = sched.step(rectified_flow_unit(x0, noise, here).target, step, x).prev_sample
        after = schedule[i + 1] if i + 1 < len(schedule) else 0.0
        expected = rectified_flow_unit(x0, noise, torch.full((8,), after, dtype=torch.float64)).x_t
        assert (x - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (x - x0).abs().max() < 1e-5 * x0.abs().max()
