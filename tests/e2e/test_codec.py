"""The codec recipe end to end: both networks accumulate exactly, resume exactly through both optimizers, and the
trained codec is a tokenizer the pretrain recipe trains on."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import EncodecModel, MusicgenForCausalLM

from hf_audio_trainer import pretrain, train_codec
from hf_audio_trainer.codecs import EncodecTokenizer, load_audio_tokenizer
from hf_audio_trainer.config import load_yaml
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import ROOT, as_flags, launch, max_abs_diff, quick_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def codec_run(output_dir, **overrides) -> dict:
    """A micro codec (3 codebooks of 16) against two small STFT heads, on 0.2 s segments of 32 synthetic clips."""
    return {
        "output_dir": str(output_dir),
        "synthetic_num_clips": 32,
        "codec_size": "micro",
        "num_codebooks": 3,
        "codebook_size": 16,
        "segment_seconds": 0.2,
        "stft_discriminator_n_ffts": "256,128",
        "mel_loss_n_ffts": "256,512",
        "discriminator_channels": 4,
        "report_to": "none",
        "logging_steps": 1,
        "eval_steps": 0,
        "eval_on_start": False,
        "save_steps": 1000,
        "num_eval_samples": 4,
        "fad_embedder": "mel",
        **overrides,
    }


def networks(folder):
    """The exported generator (plain EncodecModel weights) and discriminator."""
    return load_file(str(folder / "model.safetensors")), load_file(str(folder / "discriminator" / "model.safetensors"))


def logged(folder, first=1):
    keys = ("train/g_loss", "train/d_loss", "train/d_acc")
    return {
        m["step"]: [m.get(k) for k in keys] for m in read_metrics(folder) if "train/g_loss" in m and m["step"] >= first
    }


def same_values(a: list, b: list) -> bool:
    """Logged values equal up to float32 rounding, relative to their size (a loss of ~86 carries ~1e-5 of it), and
    missing (None) in the same places."""
    return all(
        (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-6)) for x, y in zip(a, b, strict=True)
    )


def test_accumulation_2x2_equals_4x1_for_both_networks(tmp_path):
    # step 1 trains reconstruction only, steps 2-4 the discriminator then the generator against it. Adam's first steps
    # move a weight by ~lr * sign(grad) however small the gradient, so a gradient that is zero up to float rounding
    # (the discriminator's output bias under the symmetric hinge at the start) would move by +-lr on summation-order
    # noise alone; a larger epsilon keeps those still and leaves every real gradient in charge of its update.
    common = dict(max_steps=4, discriminator_start_step=1, adam_epsilon=1e-3)
    train_codec(codec_run(tmp_path / "2x2", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common))
    train_codec(codec_run(tmp_path / "4x1", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common))
    (g_a, d_a), (g_b, d_b) = networks(tmp_path / "2x2"), networks(tmp_path / "4x1")
    assert max_abs_diff(g_a, g_b) < 1e-6, max_abs_diff(g_a, g_b)
    assert max_abs_diff(d_a, d_b) < 1e-6, max_abs_diff(d_a, d_b)
    a, b = logged(tmp_path / "2x2"), logged(tmp_path / "4x1")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert a[1][1] is None and all(a[s][1] is not None for s in (2, 3, 4))  # the discriminator started at step 2
    for step in a:
        assert same_values(a[step], b[step]), (step, a[step], b[step])
    # and the discriminator really trained: its weights left their one-step (untrained) values
    fresh = train_codec(codec_run(tmp_path / "d0", max_steps=1, discriminator_start_step=1, adam_epsilon=1e-3))
    assert max_abs_diff(networks(tmp_path / "d0")[1], d_a) > 1e-4 and fresh.global_step == 1


def test_resume_is_exact_through_both_optimizers(tmp_path):
    # the step-2 checkpoint is saved before any evaluation; the resumed run then passes an evaluated save (step 4),
    # where the best/ bookkeeping restored from that checkpoint is read
    settings = dict(
        max_steps=5, save_steps=2, eval_steps=4, discriminator_start_step=1, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, ema=True, ema_decay=0.5, discriminator_learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=1,
    )  # fmt: skip
    train_codec(codec_run(tmp_path / "straight", **settings))
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # both networks, both optimizers, both schedules, the EMA and the data position are in the checkpoint
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "scheduler.bin",
                 "scheduler_1.bin", "ema.safetensors"):  # fmt: skip
        assert name in state["files"], name
    assert state["sampler"]["epoch"] == 0 and state["global_step"] == 2
    assert state["best"] == {"metric": "eval/mel_distance"}  # nothing evaluated yet
    train_codec(codec_run(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **settings))
    best = json.loads((tmp_path / "resumed" / "best" / "trainer_state.json").read_text())["best"]
    assert best["step"] == 4 and best["value"] > 0
    (g_a, d_a), (g_b, d_b) = networks(tmp_path / "straight"), networks(tmp_path / "resumed")
    assert max_abs_diff(g_a, g_b) < 1e-6 and max_abs_diff(d_a, d_b) < 1e-6
    assert max_abs_diff(*(load_file(str(f / "ema" / "model.safetensors")) for f in (tmp_path / "straight",
                          tmp_path / "resumed"))) < 1e-6  # fmt: skip
    before, after = logged(tmp_path / "straight", first=3), logged(tmp_path / "resumed", first=3)
    assert before.keys() == after.keys() == {3, 4, 5}
    for step in before:
        assert same_values(before[step], after[step]), (step, before[step], after[step])


def test_trained_codec_tokenizes_the_pretrain_recipe(tmp_path):
    result = train_codec(codec_run(tmp_path / "codec", max_steps=2, discriminator_start_step=1, eval_steps=2))
    codec_dir = tmp_path / "codec"
    assert result.metrics["eval/mel_distance"] > 0 and "eval/fad" in result.metrics
    assert "train/d_acc_real" in result.metrics and "train/d_g_loss_ratio" in result.metrics
    assert sorted(p.name for p in (codec_dir / "samples" / "step-2").iterdir())[:2] == [
        "original-0.wav", "original-1.wav",
    ]  # fmt: skip
    # the export is a plain transformers EnCodec model plus tokenizer_config.json
    assert EncodecModel.from_pretrained(codec_dir).config.num_quantizers == 3
    tokenizer = load_audio_tokenizer(codec_dir)
    assert isinstance(tokenizer, EncodecTokenizer) and (tokenizer.num_codebooks, tokenizer.codebook_size) == (3, 16)

    lm = pretrain(
        quick_run(codec_dir, tmp_path / "lm", max_steps=2, synthetic_num_clips=32, per_device_train_batch_size=4)
    )
    assert lm.global_step == 2 and torch.isfinite(torch.tensor(lm.metrics["train/loss"]))
    model = MusicgenForCausalLM.from_pretrained(tmp_path / "lm")
    assert (model.config.num_codebooks, model.config.vocab_size) == (3, 16)
    saved = load_audio_tokenizer(tmp_path / "lm" / "tokenizer")  # the codec travels with the language model
    assert isinstance(saved, EncodecTokenizer) and saved.num_codebooks == 3


@pytest.mark.distributed
def test_two_ddp_processes_equal_one_process_with_the_whole_batch(tmp_path):
    # the recipe as a user launches it (default YAML + flags), on two gloo processes, against one process in-process
    settings = codec_run(
        tmp_path / "ddp", max_steps=3, discriminator_start_step=1, adam_epsilon=1e-3, warmup_steps=1, save_steps=3,
        per_device_train_batch_size=2,
    )  # fmt: skip
    config = ["--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29561"]
    done = launch([*config, "recipes/codec.py", *as_flags(settings)], env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == 4
    one = {**load_yaml(ROOT / "recipes" / "configs" / "codec.yaml"), **settings}
    train_codec({**one, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 4})
    (g_a, d_a), (g_b, d_b) = networks(tmp_path / "ddp"), networks(tmp_path / "one")
    assert max_abs_diff(g_a, g_b) < 1e-6 and max_abs_diff(d_a, d_b) < 1e-6
    a, b = logged(tmp_path / "ddp"), logged(tmp_path / "one")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert same_values(a[step], b[step]), (step, a[step], b[step])
