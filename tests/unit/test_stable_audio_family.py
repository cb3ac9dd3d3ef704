"""The stable_audio family's pieces: Stable Audio Open's duration rule (whole seconds), uniform times drawn per
(seed, epoch, row), the v-objective loss by hand over the window (silence included, padding out), frozen parts in
the mixed-precision dtype."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_audio_trainer.families.flow import FlowCollator, new_flow_model
from hf_audio_trainer.families.stable_audio import frozen_dtype, v_loss, whole_seconds
from hf_audio_trainer.objectives import uniform_times

FRAME_RATE = 44100 / 2048


def row(frames: int, seed: int = 0, **extra) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((4, frames)).astype(np.float32).tolist(),
        "text_states": rng.standard_normal((3, 8)).astype(np.float32).tolist(), "num_frames": frames, **extra,
    }  # fmt: skip


def collate(**kwargs) -> FlowCollator:
    return FlowCollator(FRAME_RATE, 6, seed=3, times=uniform_times, seconds=whole_seconds(44100, FRAME_RATE), **kwargs)


def test_seconds_are_the_windows_offset_rounded_down_and_the_clips_duration_rounded_up():
    seconds = whole_seconds(44100, FRAME_RATE)
    assert seconds({"window_start": 25, "num_samples": int(44100 * 2.3)}, 32) == (1.0, 3.0)  # 1.16 s in, 2.3 s long
    assert seconds({"window_start": 0, "num_samples": 44100}, 32) == (0.0, 1.0)  # exactly one second: 1
    assert seconds({"num_frames": 30}, 32) == (0.0, 2.0)  # a pair's member: its own frames (1.39 s)
    batch = collate()([row(32, row=0, epoch=0, window_start=50, num_samples=100_000)])
    assert batch["seconds_start"].tolist() == [2.0] and batch["seconds_total"].tolist() == [3.0]


def test_times_are_uniform_and_a_function_of_seed_epoch_and_row():
    a = collate()([row(4, row=r, epoch=0) for r in range(500)])["sigmas"]
    assert 0 <= a.min() and a.max() < 1 and abs(float(a.mean()) - 0.5) < 0.04 and float((a < 0.1).float().mean()) > 0.05
    b = collate()([row(4, 1, row=7, epoch=0)])
    assert b["sigmas"][0] == a[7] and torch.equal(b["noise"][0], collate()([row(4, 2, row=7, epoch=0)])["noise"][0])
    assert collate()([row(4, row=7, epoch=1)])["sigmas"][0] != a[7]  # each epoch draws anew
    fixed = [collate(fixed=True)([row(4, row_id=2)])["sigmas"][0] for _ in range(2)]
    assert fixed[0] == fixed[1]


def test_the_loss_is_the_v_error_summed_over_the_window_by_hand():
    torch.manual_seed(0)
    model = new_flow_model("micro", 4, 6, 8, 10.0)
    batch = collate()([row(6, row=0, epoch=0), row(4, 1, row=1, epoch=0)])
    with torch.no_grad():
        total, _ = v_loss(model, batch)
        t = batch["sigmas"]
        a, s = torch.cos(t * torch.pi / 2)[:, None, None], torch.sin(t * torch.pi / 2)[:, None, None]
        x0, e = batch["latents"], batch["noise"]
        args = [batch[k] for k in ("text_states", "text_mask", "keep", "seconds_start", "seconds_total")]
        pred = model(a * x0 + s * e, t, *args)  # the DiT reads t itself, not 1000 t
    err = (pred - (a * e - s * x0)).pow(2).mean(1)
    assert total.item() == pytest.approx(float(err[0].sum() + err[1, :4].sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("precision", "t5", "vae"),
    [
        ("bf16", torch.bfloat16, torch.bfloat16),
        ("fp16", torch.float32, torch.float16),
        ("no", torch.float32, torch.float32),
    ],
)
def test_frozen_parts_run_in_the_mixed_precision_dtype_but_t5_never_in_fp16(precision, t5, vae):
    accelerator = SimpleNamespace(mixed_precision=precision)
    assert (frozen_dtype(accelerator, "text_encoder"), frozen_dtype(accelerator, "vae")) == (t5, vae)
