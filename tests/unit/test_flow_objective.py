"""The flow family's objective: noise and timesteps as pure functions of (seed, epoch, row), fixed for validation,
shared by a preference pair; padded latent frames out of the loss; the null condition the pipeline's."""

import numpy as np
import pytest
import torch

from hf_audio_trainer.config import FlowConfig
from hf_audio_trainer.families.flow import FlowCollator, PairCollator, flow_loss, flow_sequence_logps, new_flow_model


def row(frames: int, seed: int = 0, text: int = 3, **extra) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((4, frames)).astype(np.float32).tolist(),
        "text_states": rng.standard_normal((text, 8)).astype(np.float32).tolist(),
        "num_frames": frames, **extra,
    }  # fmt: skip


def collate(**kwargs) -> FlowCollator:
    return FlowCollator(frame_rate=10.0, text_length=6, flow_cfg=FlowConfig(), seed=3, **kwargs)


def test_training_draws_are_a_function_of_seed_epoch_and_row_and_validation_ones_are_fixed():
    a = collate()([row(5, row=7, epoch=0), row(5, 1, row=2, epoch=0)])
    b = collate()([row(5, 1, row=2, epoch=0)])
    assert torch.equal(a["noise"][1], b["noise"][0]) and a["sigmas"][1] == b["sigmas"][0]  # batch-independent
    c = collate()([row(5, 1, row=2, epoch=1)])
    assert not torch.equal(b["noise"][0], c["noise"][0])  # each epoch draws anew
    fixed = [collate(fixed=True)([row(5, row_id=4)]) for _ in range(2)]
    assert torch.equal(fixed[0]["noise"], fixed[1]["noise"]) and torch.equal(fixed[0]["sigmas"], fixed[1]["sigmas"])
    # logit-normal timesteps: inside (0, 1), centred on 1/2 over many rows
    sigmas = collate()([row(2, row=r, epoch=0) for r in range(400)])["sigmas"]
    assert 0 < sigmas.min() and sigmas.max() < 1 and abs(float(sigmas.median()) - 0.5) < 0.05


def test_padding_masks_and_counts_frames_and_text_pads_to_the_tokenizer_length():
    batch = collate()([row(5, row=0, epoch=0, window_start=20), row(3, 1, row=1, epoch=0, text=0)])
    assert batch["latents"].shape == (2, 4, 5) and batch["num_items"] == 8
    assert batch["frame_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["text_states"].shape == (2, 6, 8) and batch["text_mask"].sum(1).tolist() == [3, 0]
    assert batch["keep"].tolist() == [1.0, 0.0]  # no description: the null condition
    assert batch["seconds_start"].tolist() == [2.0, 0.0]
    assert batch["seconds_total"].tolist() == pytest.approx([0.5, 0.3])


def test_loss_sums_unpadded_frames_of_the_velocity_error():
    torch.manual_seed(0)
    model = new_flow_model("micro", 4, 5, 8, 10.0)
    batch = collate()([row(5, row=0, epoch=0), row(3, 1, row=1, epoch=0)])
    with torch.no_grad():
        total, _ = flow_loss(model, batch)
    # by hand: x_t = (1 - s) x0 + s e, target e - x0, squared error averaged over channels, padded frames dropped
    s = batch["sigmas"][:, None, None]
    x_t = (1 - s) * batch["latents"] + s * batch["noise"]
    args = [batch[k] for k in ("text_states", "text_mask", "keep", "seconds_start", "seconds_total")]
    with torch.no_grad():
        pred = model(x_t, batch["sigmas"] * 1000, *args)
        weighted, _ = flow_loss(model, batch, weighting_scheme="sigma_sqrt")
        unmasked, _ = flow_loss(model, {**batch, "frame_mask": torch.ones(2, 5)})
    err = (pred - (batch["noise"] - batch["latents"])).pow(2).mean(1)
    assert total.item() == pytest.approx(float(err[0].sum() + err[1, :3].sum()), rel=1e-6)
    # the padded frames' errors are what the mask leaves out
    assert unmasked.item() - total.item() == pytest.approx(float(err[1, 3:].sum()), rel=1e-4)
    expected = (err[0].sum() / batch["sigmas"][0] ** 2 + err[1, :3].sum() / batch["sigmas"][1] ** 2).item()
    assert weighted.item() == pytest.approx(expected, rel=1e-5)


def test_null_condition_is_all_zero_cross_attention_as_the_pipeline_builds_it():
    torch.manual_seed(0)
    model = new_flow_model("micro", 4, 5, 8, 10.0)
    a, b = (collate(null=True)([row(5, seed, row_id=0)]) for seed in (0, 9))  # other text, same latents and draw
    b["latents"], b["noise"], b["sigmas"] = a["latents"], a["noise"], a["sigmas"]
    assert a["keep"].tolist() == [0.0]
    assert flow_loss(model, a)[0].item() == flow_loss(model, b)[0].item()  # the text is not seen at all


def test_a_pair_shares_noise_and_timestep_and_scores_each_member():
    torch.manual_seed(0)
    model = new_flow_model("micro", 4, 6, 8, 10.0)
    pair = {"chosen_latents": row(6)["latents"], "rejected_latents": row(4, 5)["latents"],
            "text_states": row(6)["text_states"], "row": 3, "epoch": 1}  # fmt: skip
    batch = PairCollator(collate())([pair])
    assert torch.equal(batch["noise"][0], batch["noise"][1]) and batch["sigmas"][0] == batch["sigmas"][1]
    assert batch["num_items"] == 1 and batch["keep"].tolist() == [1.0, 1.0]  # both conditioned on the prompt
    logps = flow_sequence_logps(model, batch)
    assert logps.shape == (2,) and (logps < 0).all()
