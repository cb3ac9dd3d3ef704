"""Diffusion objectives as plain functions, chosen by the checkpoint a family trains (a model is trained with the
objective it was made with: DESIGN.md).

An objective maps clean latents x0 [B, C, T], noise e of the same shape and a time t in [0, 1] per example [B] to
`Noised(x_t, time, target)`: the network's noisy input, the timestep it reads, and what it regresses. A time density
draws t, one example at a time, from a seeded generator (so a draw is a pure function of the data position).

- `rectified_flow`: x_t = (1 - t) x0 + t e, target the velocity e - x0, read as timestep 1000 t (diffusers' flow
  schedulers' convention); the flow family's, with SD3's densities (`sd3_times`). A model whose scheduler counts
  another `num_train_timesteps` reads t times that (Stable Audio 3's DiT: t itself, `num_train_timesteps` 1), with t
  uniform and shifted towards noise for longer sequences (`length_shift`, `shifted_times`).
- `rectified_flow_unit`: the same path and velocity, read as the time t itself in [0, 1] (ACE-Step's DiT, whose
  timestep embedding scales by 1000 inside, under `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1)`).
- `v_cosine`: Stable Audio Open's v-objective over the cosine schedule (stable-audio-tools): x_t = cos(pi t / 2) x0 +
  sin(pi t / 2) e, target v = cos(pi t / 2) e - sin(pi t / 2) x0, plain MSE, t itself read by the DiT, t uniform
  (`uniform_times`). diffusers' `CosineDPMSolverMultistepScheduler` (sigma_data 1) samples the same model in sigma
  space: sigma = tan(pi t / 2) (`cosine_sigma`), so `precondition_noise(sigma)` is t, `scale_model_input` of x0 +
  sigma e is x_t, and `precondition_outputs(x0 + sigma e, v, sigma)` is x0 (tests/unit/test_objectives.py checks it
  against the scheduler's own functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

NUM_TRAIN_TIMESTEPS = 1000  # a flow model reads timestep 1000 t, as diffusers' flow schedulers produce

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "Noised"]
TimeDensity = Callable[[torch.Generator], torch.Tensor]


class Noised(NamedTuple):
    """What the network sees and learns at one noisy point."""

    x_t: torch.Tensor  # the noisy input [B, C, T]
    time: torch.Tensor  # the timestep it reads [B]
    target: torch.Tensor  # what it regresses [B, C, T]


def rectified_flow(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_train_timesteps: float = NUM_TRAIN_TIMESTEPS
) -> Noised:
    """x_t = (1 - t) x0 + t e; the velocity e - x0, at timestep `num_train_timesteps` t (1000 t by default)."""
    s = t[:, None, None]
    return Noised((1.0 - s) * x0 + s * noise, t * num_train_timesteps, noise - x0)


def rectified_flow_unit(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
    """x_t = (1 - t) x0 + t e; the velocity e - x0, at timestep t."""
    s = t[:, None, None]
    return Noised((1.0 - s) * x0 + s * noise, t, noise - x0)


def v_cosine(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
    """x_t = cos(pi t / 2) x0 + sin(pi t / 2) e; v = cos(pi t / 2) e - sin(pi t / 2) x0, at timestep t."""
    angle = t * (math.pi / 2)
    alpha, sigma = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return Noised(alpha * x0 + sigma * noise, t, alpha * noise - sigma * x0)


def cosine_sigma(t: torch.Tensor) -> torch.Tensor:
    """The EDM noise level sigma of cosine time t (x0 + sigma e is x_t scaled by sqrt(1 + sigma^2))."""
    return torch.tan(t * (math.pi / 2))


def cosine_time(sigma: torch.Tensor) -> torch.Tensor:
    """The cosine time t of noise level sigma: 2 / pi atan(sigma) (the scheduler's `precondition_noise`)."""
    return torch.atan(sigma) * (2 / math.pi)


def uniform_times(generator: torch.Generator) -> torch.Tensor:
    """One t uniform on [0, 1) (stable-audio-tools' default sampler)."""
    return torch.rand(1, generator=generator)


def length_shift(frames: int, min_length: int = 256, max_length: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> float:  # fmt: skip
    """The time shift of a sequence of `frames` latent frames (Stable Audio 3's training "full" distribution shift):
    exp(mu), mu rising linearly from `base_shift` at `min_length` frames to `max_shift` at `max_length` (clamped), so
    longer sequences train at more noise (1.65 up to 256 frames, 3.16 from 4096)."""
    fraction = (min(max(frames, min_length), max_length) - min_length) / (max_length - min_length)
    return math.exp(base_shift + (max_shift - base_shift) * fraction)


def shifted_times(times: TimeDensity, shift: float) -> TimeDensity:
    """`times` moved towards noise by `shift` as flow schedulers shift sigmas: t -> shift t / (1 + (shift - 1) t)."""

    def draw(generator: torch.Generator) -> torch.Tensor:
        t = times(generator)
        return shift * t / (1 + (shift - 1) * t)

    return draw


def sd3_times(weighting_scheme: str, logit_mean: float, logit_std: float, mode_scale: float) -> TimeDensity:
    """SD3's timestep densities by name (diffusers' `compute_density_for_timestep_sampling`)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    def draw(generator: torch.Generator) -> torch.Tensor:
        return compute_density_for_timestep_sampling(
            weighting_scheme, 1, logit_mean, logit_std, mode_scale, generator=generator
        )

    return draw
