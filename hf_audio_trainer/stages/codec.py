"""The codec stage: an audio codec trained adversarially (the `encodec_gan` family); its output folder is an audio
tokenizer for pretrain."""

from __future__ import annotations

from hf_audio_trainer.config import CodecConfig, resolve_config
from hf_audio_trainer.families import family_for
from hf_audio_trainer.stages.common import RunResult, load_clips, run_length, shuffled_sampler, start_run, train_model

DIVERGED = "a lower --learning_rate or --discriminator_learning_rate, or a smaller --max_grad_norm"


def train_codec(config: CodecConfig | dict | str | None = None) -> RunResult:
    """Train an EnCodec-style codec with discriminators (an audio tokenizer for pretrain); notebook-ready."""
    cfg = resolve_config(config, CodecConfig)
    family = family_for(cfg.model.model_family, "codec")
    with start_run(cfg, "codec") as run:
        data = family.preprocess(run, load_clips(run))
        sampler = shuffled_sampler(run, len(data.train))
        max_steps = run_length(run, sampler)
        models = family.build_model(run, data, cfg.model.model_name_or_path)
        summary = f"{family.describe(data, models)}, discriminator from step {cfg.adversarial.discriminator_start_step}"
        return train_model(
            run, family, data, models, sampler, max_steps, summary=summary, base_model=cfg.model.model_name_or_path,
            advice=DIVERGED,
        )  # fmt: skip
