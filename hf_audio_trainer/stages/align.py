"""The align stage: preference optimisation (DPO family, TRL's losses) of a fine-tuned model against a frozen
reference, on (prompt, chosen, rejected) pairs."""

from __future__ import annotations

import torch

from hf_audio_trainer.alignment import DPOObjective
from hf_audio_trainer.config import AlignConfig, resolve_config
from hf_audio_trainer.distributed import prepare_frozen
from hf_audio_trainer.families import family_for
from hf_audio_trainer.stages.common import (
    RunResult,
    check_start_model,
    run_length,
    shuffled_sampler,
    start_run,
    train_model,
)


def align(config: AlignConfig | dict | str | None = None) -> RunResult:
    """Preference-optimise (DPO family) a fine-tuned model against a frozen reference; notebook-ready."""
    cfg = resolve_config(config, AlignConfig)
    family = family_for(cfg.model.model_family, "align")
    check_start_model(cfg, "align starts from a fine-tuned model", "finetune")
    dpo = cfg.dpo
    with start_run(cfg, "align") as run:
        acc = run.accelerator
        data = family.preferences(run)
        models = family.build_model(run, data, cfg.model.model_name_or_path)
        ref_source = dpo.ref_model_name_or_path or cfg.model.model_name_or_path
        t = cfg.training
        reference = prepare_frozen(
            acc, family.build_model(run, data, ref_source)["model"], t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
        )  # fmt: skip
        if dpo.precompute_ref_log_probs:  # one pass now; then only the policy stays in memory
            data, reference = family.precompute_reference(run, data, reference), None
        sampler = shuffled_sampler(run, len(data.train))
        max_steps = run_length(run, sampler)
        objective = DPOObjective(dpo.beta, dpo.loss_type, dpo.label_smoothing, reference, family.sequence_logps)

        def loss_fn(model: torch.nn.Module, batch: dict):
            with acc.autocast():  # the reference is not prepared, so autocast it here like the policy
                return objective(model, batch)

        summary = (
            f"{len(data.train)} train / {len(data.validation)} validation pairs; {dpo.loss_type} loss, beta "
            f"{dpo.beta}; reference {'precomputed' if reference is None else ref_source}"
        )
        return train_model(
            run, family, data, models, sampler, max_steps, summary=summary, loss_fn=loss_fn, eval_loss_fn=loss_fn,
            base_model=cfg.model.model_name_or_path, count_flops=False,
        )  # fmt: skip
