"""The align stage: preference optimisation (DPO family) of a fine-tuned model against a frozen reference."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.alignment import (
    DPOObjective,
    PreferenceCollator,
    precompute_reference_logps,
    tokenize_preferences,
)
from hf_audio_trainer.checkpoint import Checkpointer, prepare_output_dir
from hf_audio_trainer.codecs import load_audio_tokenizer
from hf_audio_trainer.config import (
    AlignConfig,
    resolve_config,
)
from hf_audio_trainer.data.codes import CodesCollator, batch_stream, eval_batches
from hf_audio_trainer.data.preferences import (
    check_preference_columns,
    drop_identical_pairs,
    load_preference_dataset,
    make_synthetic_preferences,
)
from hf_audio_trainer.distributed import prepare, prepare_frozen, stage_accelerator
from hf_audio_trainer.ema import build_ema
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.hub import model_card_writer, start_pusher
from hf_audio_trainer.loop import evaluate_metrics
from hf_audio_trainer.models import build_model
from hf_audio_trainer.optim import build_optimization
from hf_audio_trainer.stages.common import (
    RunResult,
    loop_settings,
    shuffled_sampler,
    train_and_finish,
)
from hf_audio_trainer.stages.pretrain import TOKENIZER_DIR, model_tokenizer


def align(config: AlignConfig | dict | str | None = None) -> RunResult:
    """Preference-optimise (DPO family) a fine-tuned model against a frozen reference; notebook-ready."""
    cfg = resolve_config(config, AlignConfig)
    with stage_accelerator(cfg) as accelerator:
        return _align(cfg, accelerator)


def folder_fingerprint(folder: str) -> str:
    """A hash of every file in a folder (two tokenizers are the same when their saved files are)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def prepare_preferences(cfg: AlignConfig, accelerator: Accelerator, tokenizer):
    """Load the pairs (embedded synthetic ones by default), check them, drop identical pairs, tokenize both splits."""
    d = cfg.data
    with accelerator.main_process_first():
        if d.dataset_name is None:
            pairs = make_synthetic_preferences(d.synthetic_num_pairs, cfg.training.seed, d.prompt_seconds)
        else:
            pairs = load_preference_dataset(
                d.dataset_name, d.dataset_config_name, d.validation_split_percentage, cfg.training.seed
            )
        check_preference_columns(pairs)
        splits = {}
        for name in ("train", "validation"):
            kept, dropped = drop_identical_pairs(pairs[name])
            if dropped:
                accelerator.print(f"skipped {dropped} {name} pair(s) whose chosen and rejected are identical")
            if len(kept) == 0:
                raise ConfigError(f"the {name} split has no usable preference pairs (all chosen == rejected, or empty)")
            splits[name] = tokenize_preferences(
                kept, tokenizer, d.max_duration_seconds, d.preprocessing_num_workers, split=name
            )
            splits[name], dropped_codes = drop_identical_pairs(splits[name])
            if dropped_codes:
                accelerator.print(f"skipped {dropped_codes} {name} pair(s) whose chosen and rejected codes match")
    return splits["train"], splits["validation"]


def _align(cfg: AlignConfig, accelerator: Accelerator) -> RunResult:
    t, dpo = cfg.training, cfg.dpo
    resume = prepare_output_dir(cfg, accelerator)
    pusher = start_pusher(cfg, accelerator)
    policy_tokenizer = cfg.data.tokenizer or model_tokenizer(cfg.model.model_name_or_path)
    ref_source = dpo.ref_model_name_or_path or cfg.model.model_name_or_path
    if dpo.ref_model_name_or_path is not None:
        ref_tokenizer = model_tokenizer(ref_source)
        if folder_fingerprint(ref_tokenizer) != folder_fingerprint(policy_tokenizer):
            raise ConfigError(
                f"the reference model's tokenizer ({ref_tokenizer}) differs from the policy's ({policy_tokenizer}): "
                "DPO compares log-probabilities of the same codes, so both must use one tokenizer"
            )
    tokenizer = load_audio_tokenizer(policy_tokenizer)
    train_set, val_set = prepare_preferences(cfg, accelerator, tokenizer)
    lengths = [len(p[0]) + max(len(c[0]), len(r[0])) for s in (train_set, val_set) for p, c, r in zip(
        s["prompt_codes"], s["chosen_codes"], s["rejected_codes"], strict=True
    )]  # fmt: skip
    k = tokenizer.num_codebooks
    build = functools.partial(
        build_model, size=cfg.model.model_size, num_codebooks=k, codebook_size=tokenizer.codebook_size,
        max_positions=max(lengths) + k + 1, dropout=cfg.model.dropout,
    )  # fmt: skip
    model = build(cfg.model.model_name_or_path)
    reference = prepare_frozen(cfg, accelerator, build(ref_source))
    collate = PreferenceCollator(
        CodesCollator(k, model.config.pad_token_id, model.config.bos_token_id, tokenizer.frame_rate)
    )
    if dpo.precompute_ref_log_probs:  # one pass now; then only the policy stays in memory
        with accelerator.autocast():
            train_set = precompute_reference_logps(reference, train_set, collate, accelerator.device)
            val_set = precompute_reference_logps(reference, val_set, collate, accelerator.device)
        reference = None
    global_batch, sampler, max_steps = shuffled_sampler(cfg, accelerator, len(train_set))
    optimizer, scheduler = build_optimization(cfg, accelerator, model, global_batch, max_steps)
    model, optimizer, scheduler = prepare(cfg, accelerator, model, optimizer, scheduler)
    ema = build_ema(cfg, accelerator.unwrap_model(model))

    def export(folder: Path, use_ema: bool) -> None:
        swap = ema.average_parameters(accelerator.unwrap_model(model)) if use_ema else contextlib.nullcontext()
        with swap:
            ckpt.save_final_model(accelerator, model, folder, lambda f: tokenizer.save_pretrained(f / TOKENIZER_DIR))

    checkpointer = Checkpointer(
        cfg, accelerator, global_batch, max_steps,
        save_extras=lambda folder: tokenizer.save_pretrained(folder / TOKENIZER_DIR),
        extra_state=lambda step: {"sampler": sampler.state_at_step(step)},
        ema=ema, pusher=pusher, export=export,
        card=model_card_writer(cfg, "align", cfg.model.model_name_or_path, [cfg.data.dataset_name or "synthetic"]),
    )  # fmt: skip
    start_step = checkpointer.resume(resume) if resume is not None else 0
    accelerator.init_trackers("align", config=cfg.to_flat_dict())
    accelerator.print(
        f"{len(train_set)} train / {len(val_set)} validation pairs; {dpo.loss_type} loss, beta {dpo.beta}; "
        f"reference {'precomputed' if reference is None else ref_source}; global batch {global_batch}; "
        f"{max_steps} steps"
    )
    columns = ["prompt_codes", "chosen_codes", "rejected_codes"]
    columns += ["ref_chosen_logps", "ref_rejected_logps"] if reference is None else []
    batches = batch_stream(train_set, sampler, t.per_device_train_batch_size, collate, start_step, columns)
    objective = DPOObjective(dpo.beta, dpo.loss_type, dpo.label_smoothing, reference)

    def loss_fn(m: torch.nn.Module, batch: dict):
        with accelerator.autocast():  # the reference is not prepared, so autocast it here like the policy
            return objective(m, batch)

    def evaluate(step: int) -> dict[str, float]:
        stream = lambda: eval_batches(  # noqa: E731
            val_set, t.per_device_eval_batch_size, collate, accelerator.process_index, accelerator.num_processes,
            columns,
        )  # fmt: skip
        results = {f"eval/{k}": v for k, v in evaluate_metrics(accelerator, model, stream, loss_fn).items()}
        if ema is not None:
            with ema.average_parameters(accelerator.unwrap_model(model)):
                ema_metrics = evaluate_metrics(accelerator, model, stream, loss_fn)
            results.update({f"eval/{k}_ema": v for k, v in ema_metrics.items()})
        checkpointer.record(step, results)
        return results

    settings = loop_settings(cfg, accelerator, max_steps)
    return train_and_finish(
        cfg, accelerator, checkpointer, settings, model, optimizer, scheduler, batches, loss_fn, start_step,
        evaluate, ema,
    )  # fmt: skip
