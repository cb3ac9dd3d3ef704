"""The finetune stage: a pretrained model (folder or Hub id) on smaller, high-quality data, all weights, some frozen,
or LoRA adapters (peft) merged into the export."""

from __future__ import annotations

from hf_audio_trainer.config import FinetuneConfig, resolve_config
from hf_audio_trainer.families import family_for
from hf_audio_trainer.models import adapt_for_finetuning
from hf_audio_trainer.stages.common import RunResult, check_start_model, start_run, train_model
from hf_audio_trainer.stages.pretrain import prepare_training


def finetune(config: FinetuneConfig | dict | str | None = None) -> RunResult:
    """Fine-tune a pretrained model (folder or Hub id) on high-quality data, optionally with LoRA; notebook-ready."""
    cfg = resolve_config(config, FinetuneConfig)
    family = family_for(cfg.model.model_family, "finetune")
    check_start_model(cfg, "finetune starts from a pretrained model", "pretrain")
    with start_run(cfg, "finetune") as run:
        data, sampler, max_steps, models = prepare_training(run, family)
        f = cfg.finetune
        main = next(iter(models))
        models[main] = adapt_for_finetuning(
            models[main],
            f.freeze_modules,
            f.use_peft,
            f.lora_r,
            f.lora_alpha,
            f.lora_dropout,
            f.lora_target_modules or family.lora_target_modules,
        )
        return train_model(run, family, data, models, sampler, max_steps, base_model=cfg.model.model_name_or_path)
