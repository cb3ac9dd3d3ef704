"""The codec recipe's pieces against hand-computed values: adversarial losses, discriminator accuracy, feature
matching, SI-SDR, the trainable quantizer (codes and export as transformers' EncodecModel sees them), per-network
loss scaling, resumable segments and the config's errors."""

import math

import numpy as np
import pytest
import torch
from transformers import EncodecModel

from hf_audio_trainer.adversarial import (
    ADVERSARIAL_LOSSES,
    Discriminators,
    Player,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    step_player,
)
from hf_audio_trainer.codec import (
    CodecGenerator,
    MultiScaleMelDistance,
    build_codec,
    init_codebooks,
    new_codec_config,
    segment_stream,
    si_sdr,
)
from hf_audio_trainer.codecs import EncodecTokenizer, load_audio_tokenizer
from hf_audio_trainer.config import CodecConfig, config_from_dict
from hf_audio_trainer.curriculum import CurriculumSampler
from hf_audio_trainer.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def maps(*per_clip_means):
    """Logit maps [clips, 2, 3] whose per-clip means are the given values (each map varies around its mean)."""
    ripple = torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
    return torch.stack([m + ripple for m in per_clip_means])


def test_discriminator_accuracy_on_a_hand_built_case():
    # two heads, three clips; hinge decides real when the mean logit > 0
    real = [maps(0.5, -0.2, 2.0), maps(0.1, 0.3, -1.0)]
    fake = [maps(-0.5, 0.4, -3.0), maps(0.2, -0.1, 0.0)]
    on_real, on_fake = discriminator_accuracy(real, fake, ADVERSARIAL_LOSSES["hinge"].threshold)
    # clip 0: real 2/2 right, fake 1/2 (0.2 > 0 is called real); clip 1: real 1/2, fake 1/2; clip 2: real 1/2,
    # fake 2/2 (a mean of exactly 0 is not above the threshold, so it is called generated)
    assert on_real.tolist() == [1.0, 0.5, 0.5]
    assert on_fake.tolist() == [0.5, 0.5, 1.0]
    # LSGAN's targets are 1 (real) and 0 (fake): the boundary is 0.5
    on_real, on_fake = discriminator_accuracy(real, fake, ADVERSARIAL_LOSSES["lsgan"].threshold)
    assert on_real.tolist() == [0.0, 0.0, 0.5] and on_fake.tolist() == [1.0, 1.0, 1.0]  # 0.5 is not above 0.5


def test_adversarial_losses_against_hand_computed_values():
    real = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, 0.5]])]  # one clip, two heads, two positions each
    fake = [torch.tensor([[-2.0, 1.0]]), torch.tensor([[0.0, -0.5]])]
    hinge = ADVERSARIAL_LOSSES["hinge"]
    # head 0: relu(1-2)=0, relu(1-0)=1 -> 0.5 ; fake relu(1-2)=0, relu(1+1)=2 -> 1.0 ; total 1.5
    # head 1: real 0.5 ; fake relu(1+0)=1, relu(1-0.5)=0.5 -> 0.75 ; total 1.25 ; mean over heads 1.375
    assert discriminator_loss(real, fake, hinge).tolist() == pytest.approx([1.375])
    # generator: head 0 relu(1+2)=3, relu(1-1)=0 -> 1.5 ; head 1 relu(1-0)=1, relu(1+0.5)=1.5 -> 1.25
    assert generator_adversarial_loss(fake, hinge).tolist() == pytest.approx([1.375])
    lsgan = ADVERSARIAL_LOSSES["lsgan"]
    # head 0: real ((1)^2 + (-1)^2)/2 = 1, fake (4 + 1)/2 = 2.5 ; head 1: real 0.25, fake 0.125 ; mean 1.9375
    assert discriminator_loss(real, fake, lsgan).tolist() == pytest.approx([1.9375])
    # generator: head 0 (9 + 0)/2 = 4.5 ; head 1 (1 + 2.25)/2 = 1.625 ; mean 3.0625
    assert generator_adversarial_loss(fake, lsgan).tolist() == pytest.approx([3.0625])


def test_feature_matching_is_a_per_clip_l1_averaged_over_layers_and_heads():
    real = [[torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[3.0], [1.0]])]]  # one head, two layers, 2 clips
    fake = [[torch.tensor([[0.0, 0.0], [0.0, 4.0]]), torch.tensor([[3.0], [0.0]])]]
    # clip 0: layer 0 (1 + 2) / 2 = 1.5, layer 1 0 -> 0.75 ; clip 1: layer 0 2, layer 1 1 -> 1.5
    assert feature_matching_loss(real, fake).tolist() == pytest.approx([0.75, 1.5])


def test_si_sdr_against_a_hand_computed_value():
    s = torch.tensor([1.0, -1.0, 1.0, -1.0])
    n = torch.tensor([1.0, 1.0, -1.0, -1.0])  # zero-mean and orthogonal to s
    # ||s||^2 = 4, ||0.5 n||^2 = 1 -> 10 log10(4) dB; scaling the estimate changes nothing
    assert si_sdr((s + 0.5 * n)[None], s[None]).item() == pytest.approx(10 * math.log10(4), abs=1e-5)
    assert si_sdr((3 * (s + 0.5 * n))[None], s[None]).item() == pytest.approx(10 * math.log10(4), abs=1e-5)


def test_mel_distance_is_zero_for_identical_audio_and_grows_with_the_error():
    mel = MultiScaleMelDistance(16000, (256, 512))
    audio = torch.randn(2, 1, 4000)
    assert mel(audio, audio).abs().max().item() == 0.0
    near, far = mel(audio + 0.01 * torch.randn_like(audio), audio), mel(audio + 0.5 * torch.randn_like(audio), audio)
    assert (0 < near).all() and (near < far).all()


@pytest.fixture
def generator():
    torch.manual_seed(0)
    model = EncodecModel(new_codec_config("micro", 16000, num_codebooks=3, codebook_size=16))
    gen = CodecGenerator(model)
    init_codebooks(gen, torch.randn(4, 1, 3200), seed=0)
    return gen


def test_trained_codes_and_audio_are_what_the_exported_encodec_model_gives(generator, tmp_path):
    assert generator.num_codebooks == 3
    audio = torch.randn(2, 1, 3200)
    with torch.no_grad():
        out = generator(audio)
    EncodecTokenizer(generator.codec).save_pretrained(tmp_path)  # what the recipe's export writes
    loaded = EncodecModel.from_pretrained(tmp_path)  # a plain transformers model: buffers, no parameters
    assert not any("codebook" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        encoded = loaded.encode(audio, bandwidth=loaded.config.target_bandwidths[0])
        decoded = loaded.decode(encoded.audio_codes, [None]).audio_values[..., :3200]
    assert torch.equal(encoded.audio_codes[0].transpose(0, 1), out["codes"])  # [codebooks, batch, frames]
    assert torch.allclose(decoded, out["audio"], atol=1e-5)
    tokenizer = load_audio_tokenizer(tmp_path)
    assert (tokenizer.num_codebooks, tokenizer.codebook_size, tokenizer.frame_rate) == (3, 16, 50)
    assert torch.equal(tokenizer.encode(audio[0, 0]), out["codes"][:, 0])


def test_straight_through_and_commitment_train_the_encoder(generator):
    audio = torch.randn(2, 1, 3200)
    out = generator(audio)
    (out["audio"].pow(2).mean() + out["commitment"].sum()).backward()
    encoder_grad = generator.codec.encoder.layers[0].conv.parametrizations.weight.original1.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    # without the commitment term the encoder still learns, through the straight-through estimator
    generator.zero_grad()
    generator(audio)["audio"].pow(2).mean().backward()
    assert generator.codec.encoder.layers[0].conv.parametrizations.weight.original1.grad.abs().sum() > 0
    assert not any("codebook" in name for name, _ in generator.named_parameters())  # codebooks stay buffers


class OneProcess:
    num_processes = 1


def test_ema_codebook_update_against_hand_computed_values(generator):
    generator.update_codebooks(OneProcess(), applied=False)  # drop the statistics of the fixture's forward
    book = generator.codebooks[0]
    size, dim = book.embed.shape
    with torch.no_grad():
        book.embed_avg.copy_(torch.ones(size, dim))
        book.cluster_size.fill_(1.0)
        book.embed.copy_(book.embed_avg)
    frames = torch.zeros(3, dim)
    frames[:, 0] = torch.tensor([3.0, 5.0, 10.0])  # frames 0 and 1 go to entry 2, frame 2 to entry 5
    counts, sums = torch.zeros(size), torch.zeros(size, dim)
    counts[2], counts[5] = 2, 1
    sums[2], sums[5] = frames[0] + frames[1], frames[2]
    others = [torch.zeros(size) for _ in range(2)], [torch.zeros(size, dim) for _ in range(2)]
    generator.step_counts, generator.step_sums = [counts, *others[0]], [sums, *others[1]]
    generator.step_frames = [[frames], [], []]
    generator.decay, generator.dead_code_threshold = 0.5, 0.0  # no restarts here
    generator.update_codebooks(OneProcess())
    cluster = torch.full((size,), 0.5)
    cluster[2], cluster[5] = 1.5, 1.0  # 0.5 * 1 + 0.5 * count
    assert torch.allclose(book.cluster_size, cluster)
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + size * 1e-5) * n  # EnCodec's Laplace smoothing
    expected_2 = (0.5 * torch.ones(dim) + 0.5 * sums[2]) / smoothed[2]
    assert torch.allclose(book.embed[2], expected_2) and torch.allclose(
        book.embed[0], 0.5 / smoothed[0] * torch.ones(dim)
    )
    assert generator.step_counts == [] and generator.step_frames == [[], [], []]  # cleared for the next step


def test_unused_codebook_entries_restart_at_the_worst_quantized_frames(generator):
    generator.update_codebooks(OneProcess(), applied=False)
    generator.dead_code_threshold = 0.5
    book = generator.codebooks[1]
    with torch.no_grad():
        book.cluster_size.fill_(1.0)
        book.cluster_size[7] = 0.1  # entry 7 has not been used for a while
    audio = torch.randn(2, 1, 3200)
    generator(audio)  # a training forward with gradients records the step's assignments
    frames = torch.cat(generator.step_frames[1])
    generator.update_codebooks(OneProcess())
    # entry 7 (alone below the threshold after the EMA update) now holds the frame quantized worst by the others
    assert any(torch.equal(book.embed[7], f) for f in frames)
    others = torch.cat([book.embed[:7], book.embed[8:]])
    assert torch.equal(book.embed[7], frames[torch.cdist(frames, others).min(1).values.argmax()])
    assert book.cluster_size[7].item() == pytest.approx(0.5)


def tiny_player(name, scaler):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return Player(name, model, optimizer, scheduler, max_grad_norm=1.0, scaler=scaler)


def test_each_network_has_its_own_loss_scale():
    g = tiny_player("g", torch.amp.GradScaler("cpu", init_scale=1024.0))
    d = tiny_player("d", torch.amp.GradScaler("cpu", init_scale=1024.0))
    g_before = [p.detach().clone() for p in g.model.parameters()]
    d_before = [p.detach().clone() for p in d.model.parameters()]
    g.scaler.scale(g.model(torch.ones(1, 2)).sum()).backward()
    d.scaler.scale(d.model(torch.ones(1, 2)).sum() * float("inf")).backward()  # the discriminator overflows
    for player in (g, d):
        player.scaler.unscale_(player.optimizer)
    assert step_player(g, True) and not step_player(d, False)
    # the overflow skipped the discriminator's step and halved only its scale; the generator stepped as usual
    assert all(torch.equal(a, b) for a, b in zip(d_before, d.model.parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(g_before, g.model.parameters(), strict=True))
    assert (g.scaler.get_scale(), d.scaler.get_scale()) == (1024.0, 512.0)
    assert (g.scheduler.last_epoch, d.scheduler.last_epoch) == (1, 0)


def test_segments_resume_without_replay():
    train = make_synthetic_dataset(num_clips=24, seed=0)["train"]

    def stream(start_step):
        sampler = CurriculumSampler([0.0] * len(train), 4, seed=1)
        return segment_stream(train, sampler, 2, 800, 16000, seed=1, start_step=start_step)

    straight = [next(b) for b in [stream(0)] for _ in range(12)]  # 6 steps of 2 micro-batches (global batch 4)
    resumed = [next(b) for b in [stream(3)] for _ in range(6)]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(straight[6:], resumed, strict=True))
    assert straight[0]["audio"].shape == (2, 1, 800) and straight[0]["num_items"] == 2


def test_discriminator_heads_and_shapes():
    d = Discriminators({"msstft": [128, 64], "mpd": [2, 3]}, channels=2)
    outputs = d(torch.randn(3, 1, 1000))
    assert len(outputs) == 4
    assert all(logits.shape[0] == 3 and len(features) >= 4 for logits, features in outputs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adversarial_loss_type": "wgan"}, "choose one of ['hinge', 'lsgan']"),
        ({"max_steps": 10, "discriminator_start_step": 20}, "discriminator_start_step=20 is after max_steps=10"),
        ({"feature_matching_loss_weight": -1.0}, "feature_matching_loss_weight=-1.0: loss weights must be >= 0"),
        ({"segment_seconds": 0.02}, "shorter than the STFT discriminator's largest n_fft (512)"),
        ({"discriminators": "msstft,mrd"}, "unknown 'mrd'"),
        ({"codebook_size": 100}, "must be a power of 2"),
    ],
)
def test_bad_codec_configs_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_dict(overrides, CodecConfig)


def test_sample_rate_mismatch_with_a_loaded_codec_is_an_error(tmp_path):
    EncodecModel(new_codec_config("micro", 16000, 2, 16)).save_pretrained(tmp_path)
    assert build_codec(str(tmp_path), "tiny", None, 4, 256).config.sampling_rate == 16000
    with pytest.raises(ValueError, match="codec_sample_rate=24000 but .* runs at 16000 Hz"):
        build_codec(str(tmp_path), "tiny", 24000, 4, 256)


def test_generator_gradients_do_not_reach_a_frozen_discriminator():
    from hf_audio_trainer.adversarial import frozen

    d = Discriminators({"msstft": [64]}, channels=2)
    audio = torch.randn(1, 1, 400, requires_grad=True)
    with frozen(d):
        d(audio)[0][0].mean().backward()
    assert audio.grad is not None and all(p.grad is None and p.requires_grad for p in d.parameters())
    assert np.isfinite(audio.grad.numpy()).all()
