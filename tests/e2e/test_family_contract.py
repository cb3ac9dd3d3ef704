"""What every model family in FAMILIES promises, tested the same way for each: it builds and preprocesses the embedded
data, one optimizer step lowers its loss on a fixed batch, it exports a folder its own library loads, and a resumed
run ends exactly where a straight one does. A new family adds its tiny settings to TINY and passes these."""

import pytest
import torch

from hf_audio_trainer import finetune, pretrain, train_codec
from hf_audio_trainer.config import CodecConfig, FinetuneConfig, PretrainConfig, resolve_config
from hf_audio_trainer.families import FAMILIES
from hf_audio_trainer.loop import DefaultStep
from hf_audio_trainer.optim import build_optimization
from hf_audio_trainer.stages.common import load_clips, shuffled_sampler, start_run
from tests.e2e.test_codec import codec_run
from tests.helpers import (
    fit_small_tokenizer,
    flow_quick_run,
    max_abs_diff,
    quick_run,
    stable_audio_3_quick_run,
    stable_audio_quick_run,
    tiny_codec,
    tiny_stable_audio,
    tiny_stable_audio_3,
    weights,
)
from tests.tiny_ace_step import ace_step_quick_run, tiny_ace_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STAGES = {
    "pretrain": (pretrain, PretrainConfig),
    "codec": (train_codec, CodecConfig),
    "finetune": (finetune, FinetuneConfig),  # a family that only continues a checkpoint (stable_audio)
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """What the families' tiny runs start from: mel k-means for musicgen, a tiny EnCodec for musicgen_text, a tiny
    Stable-Audio-Open-shaped pipeline for stable_audio, a tiny Stable-Audio-3-shaped one for stable_audio_3, a tiny
    AceStepPipeline for ace_step."""
    return {
        "mel_kmeans": fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer")),
        "encodec": tiny_codec(tmp_path_factory.mktemp("codec")),
        "stable_audio": tiny_stable_audio(tmp_path_factory.mktemp("stable_audio")),
        "stable_audio_3": tiny_stable_audio_3(tmp_path_factory.mktemp("stable_audio_3") / "source"),
        "ace_step": tiny_ace_step(tmp_path_factory.mktemp("ace_step")),
    }


def tiny(name: str, tokenizer, output_dir, **overrides) -> dict:
    """A few-step run of family `name` on the embedded data, as small as it goes."""
    settings = {
        "musicgen": lambda: quick_run(tokenizer["mel_kmeans"], output_dir, model_size="micro", learning_rate=1e-2),
        # condition dropout on (high, so some rows after the resume point surely get the null condition): resume
        # must drop the same examples as the straight run
        "musicgen_text": lambda: quick_run(
            tokenizer["encodec"],
            output_dir,
            model_family="musicgen_text",
            model_size="micro",
            learning_rate=1e-2,
            max_duration_seconds=1.0,
            condition_dropout=0.5,
        ),  # fmt: skip
        "encodec_gan": lambda: codec_run(output_dir, discriminator_start_step=1, learning_rate=3e-3),
        # the weight-free block DCT latents and a micro DiT; dropout on for the same reason as musicgen_text
        "flow": lambda: flow_quick_run(output_dir, condition_dropout=0.5),
        # fine-tunes the tiny pipeline (its stereo VAE, its DiT's 32-frame windows); dropout on, as above
        "stable_audio": lambda: stable_audio_quick_run(
            tokenizer["stable_audio"], output_dir, condition_dropout=0.5, learning_rate=1e-2
        ),
        # fine-tunes the tiny Stable-Audio-3-shaped pipeline (its SAME VAE, T5Gemma); dropout on, as above
        "stable_audio_3": lambda: stable_audio_3_quick_run(
            tokenizer["stable_audio_3"], output_dir, condition_dropout=0.5, learning_rate=1e-2
        ),
        # fine-tunes the tiny AceStepPipeline (whole 1-s clips, its recipe's LoRA of rank 64 at alpha 128, which
        # overshoots the fixed batch at 1e-2); dropout on, as above
        "ace_step": lambda: ace_step_quick_run(
            tokenizer["ace_step"], output_dir, condition_dropout=0.5, learning_rate=1e-3, lora_dropout=0.0
        ),
    }[name]()
    return {**settings, **overrides}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_step_lowers_the_loss_on_a_fixed_batch(name, tokenizer, tmp_path):
    family = FAMILIES[name]
    stage = family.stages[0]
    cfg = resolve_config(tiny(name, tokenizer, tmp_path / "run", max_steps=1, warmup_steps=0), STAGES[stage][1])
    with start_run(cfg, stage) as run:
        data = family.preprocess(run, load_clips(run))
        assert len(data.train) > 0 and len(data.validation) > 0
        models = family.build_model(run, data, cfg.model.model_name_or_path)  # None: a new model
        main = next(iter(models))
        sampler = shuffled_sampler(run, len(data.train))
        if family.optimizers is not None:
            optimizers, schedulers = family.optimizers(run, data, models, 4, 1)
        else:
            optimizer, scheduler = build_optimization(cfg.optim, run.accelerator, models[main], 4, 1)
            optimizers, schedulers = [optimizer], [scheduler]
        if family.prepare is not None:
            models, optimizers, schedulers = family.prepare(run, data, models, optimizers, schedulers)
        loss_fn = family.loss(run, data, models)
        step = (
            family.step(run, data, models, optimizers, schedulers, loss_fn)
            if family.step is not None
            else DefaultStep(run.accelerator, models[main], optimizers[0], schedulers[0], loss_fn, 1.0)
        )
        batch = next(family.batches(run, data, models, sampler, 0))

        def loss() -> float:
            with torch.no_grad():
                total, _ = loss_fn(models[main], batch)
            return total.item() / batch["num_items"]

        before = loss()
        output = step(0, [batch], float(batch["num_items"]))
        assert output.stepped
        assert loss() < before


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_export_loads_with_its_own_library_and_resume_is_exact(name, tokenizer, tmp_path):
    family = FAMILIES[name]
    run_stage = STAGES[family.stages[0]][0]
    settings = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    straight = tmp_path / "straight"
    result = run_stage(tiny(name, tokenizer, straight, **settings))
    assert result.global_step == 4
    loaded = family.load_export(straight)  # its library alone: transformers here, not this package
    assert type(loaded).__module__.split(".")[0] in ("transformers", "diffusers")
    resumed = tmp_path / "resumed"
    run_stage(tiny(name, tokenizer, resumed, resume_from_checkpoint=str(straight / "checkpoint-2"), **settings))
    assert max_abs_diff(weights(straight), weights(resumed)) < 1e-6
