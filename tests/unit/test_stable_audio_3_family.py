"""The stable_audio_3 family's pieces against diffusers' StableAudio3Pipeline and the stable-audio-3 trainers'
conventions: the time the DiT reads is the scheduler's timestep, the length shift is the trainers' "full" shift, the
model's conditioning is the pipeline's (text, null condition, duration) bit for bit, and windows of a fixed width keep
each row's noise independent of its neighbours."""

import math

import numpy as np
import pytest
import torch

from hf_audio_trainer.families.flow import FlowCollator, padded_states
from hf_audio_trainer.objectives import length_shift, rectified_flow, shifted_times, uniform_times
from tests.helpers import tiny_stable_audio_3


def reference_full_shift(t: float, length: float, lo=256, hi=4096, base=0.5, top=1.15) -> float:
    """The stable-audio-3 trainers' "full" distribution shift, as their training code writes it."""
    mu = -(base + (top - base) * (min(max(length, lo), hi) - lo) / (hi - lo))
    return 1.0 - math.exp(mu) / (math.exp(mu) + (1.0 / (1.0 - t) - 1.0))


@pytest.mark.parametrize("frames", [10, 256, 1300, 4096, 9000])
def test_the_length_shift_is_the_trainers_full_shift(frames):
    shift = length_shift(frames)
    for u in torch.linspace(0.01, 0.99, 50, dtype=torch.float64):
        draw = shifted_times(lambda generator, u=u: u.reshape(1), shift)(torch.Generator())
        assert draw.item() == pytest.approx(reference_full_shift(u.item(), frames), rel=1e-9)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)  # a function of the generator alone
    assert shifted_times(uniform_times, shift)(a).item() == shifted_times(uniform_times, shift)(b).item()
    assert length_shift(1) == pytest.approx(math.exp(0.5)) and length_shift(10**5) == pytest.approx(math.exp(1.15))


def test_the_dit_reads_the_schedulers_timestep_of_the_same_noise_level():
    """x_t at noise level t is what the flow scheduler's step assumes (x0 = x_t - sigma v), and its time input is the
    scheduler's timestep for sigma t (num_train_timesteps 1: t itself; 1000: 1000 t)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, noise = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    t = torch.tensor([0.1, 0.5, 0.93])
    for scale in (1, 1000):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=scale, shift=1.0)
        sched.set_timesteps(sigmas=t.tolist())
        x_t, time, v = rectified_flow(x0, noise, t, num_train_timesteps=scale)
        assert torch.allclose(time, sched.timesteps, rtol=1e-6)
        for i in range(3):  # the stochastic step's x0 estimate from the true velocity is the data
            assert torch.allclose(x_t[i] - sched.sigmas[i] * v[i], x0[i], atol=1e-5)


def test_the_model_conditions_as_the_pipeline_does(tmp_path):
    """The model's forward == the pipeline's own transformer call (its encode_prompt, encode_duration and
    prepare_cross_attention), for described rows and for the null condition (the empty prompt, duration kept)."""
    from diffusers import StableAudio3Pipeline

    from hf_audio_trainer.families.stable_audio_3 import PromptEncoder, load_pipeline_model, prompt_ids

    source = tiny_stable_audio_3(tmp_path / "source")
    pipe = StableAudio3Pipeline.from_pretrained(source)
    model = load_pipeline_model(str(source)).eval()
    encode = PromptEncoder(pipe.tokenizer)
    assert (encode.length, encode.side) == (64, "left")
    prompts = ["a melody of notes", "an arpeggio played on a sawtooth synth, heavy noise"]
    null = encode(pipe.text_encoder, [pipe.tokenizer("")["input_ids"]], "cpu")
    model.set_null(*(x[0] for x in padded_states(null, encode.length, encode.side)))
    states, mask = padded_states(encode(pipe.text_encoder, prompt_ids(pipe.tokenizer, prompts), "cpu"), 64, "left")
    x, timesteps, seconds = torch.randn(2, 8, 7), torch.tensor([0.3, 0.8]), torch.tensor([1.5, 1.5])
    with torch.no_grad():
        ours = model(x, timesteps, states, mask, torch.tensor([1.0, 0.0]), torch.zeros(2), seconds)
        duration = pipe.encode_duration(1.5, "cpu", 1, 2)
        embeds, embeds_mask = pipe.encode_prompt([prompts[0], ""], "cpu", 1)
        context, context_mask = pipe.prepare_cross_attention(embeds, embeds_mask, duration)
        theirs = pipe.transformer(x, timesteps, encoder_hidden_states=context, global_hidden_states=duration,
                                  encoder_attention_mask=context_mask, return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours, theirs)


def test_fixed_windows_keep_each_rows_noise_and_padding_on_the_tokenizers_side():
    rng = np.random.default_rng(0)

    def row(frames: int, r: int, tokens: int) -> dict:
        latents = rng.standard_normal((8, frames)).astype(np.float32).tolist()
        states = rng.standard_normal((tokens, 4)).astype(np.float32).tolist()
        return {"latents": latents, "row": r, "epoch": 0, "text_states": states, "num_frames": frames}

    collate = FlowCollator(10.0, 6, seed=1, times=uniform_times, width=12, text_side="left")
    a, b = row(5, 0, 2), row(12, 1, 3)
    alone, together = collate([a]), collate([a, b])
    assert alone["latents"].shape == (1, 8, 12) and torch.equal(alone["noise"][0], together["noise"][0])
    assert alone["frame_mask"][0].tolist() == [1.0] * 5 + [0.0] * 7 and alone["num_items"] == 5
    assert together["text_mask"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert torch.equal(together["text_states"][0, 4:], torch.tensor(a["text_states"]))
    assert torch.allclose(together["seconds_total"], torch.tensor([0.5, 1.2]))  # each clip's own duration
    right = FlowCollator(10.0, 6, seed=1, times=uniform_times)([a, b])
    assert right["latents"].shape == (2, 8, 12) and right["text_mask"][0].tolist() == [1, 1, 0, 0, 0, 0]
