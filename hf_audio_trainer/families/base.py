"""What a model family is: the functions a stage asks for, in one frozen dataclass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family. Its functions take the stage's `Run` (config, accelerator, output folder, resume) and the
    family's own `data` object (what `preprocess` made), so no other module needs to know the model's type.

    - `preprocess(run, clips)` -> data: the audio clips (`{"train", "validation"}` datasets) as the model reads
      them (codes, latents ...), computed once and cached by `datasets`, with whatever made them (a tokenizer).
    - `build_model(run, data, model_name_or_path)` -> the networks to train by name; the first one is the main one
      (the one the EMA follows and `export` writes).
    - `batches(run, data, models, sampler, start_step)` -> this process's endless micro-batches (`loop.Batch`).
    - `loss(run, data, models)` -> `loss_fn(model, batch) -> (sum of per-item losses, per-item stat sums)`.
    - `evaluate(run, data, models)` -> `evaluate(step, suffix, sample) -> {"eval/<name><suffix>": value}` for the
      weights in place (the stage calls it for the raw weights and, with suffix "_ema", under the EMA; `sample` is
      true on the last of those passes, where generation-based metrics are measured).
    - `flops_per_item(models, data)` -> training FLOPs per loss item, for MFU (0: not logged).
    - `export(run, data, models, folder)` -> a folder its own library loads without this package.
    - `load_export(folder)` -> that library's model, loaded from an export (what users and the contract test do).
    - `describe(data, models)` -> the summary printed at start.
    - `headline`: the validation metric whose change the run reports at the end.
    - `checkpoint_files(run, data, models, folder)` (optional): what a checkpoint needs beside the weights (the
      tokenizer).
    - `optimizers(run, data, models, global_batch, max_steps)` (optional): (optimizers, schedulers), one per
      network; unset: one of each from the config's optim section.
    - `prepare(run, data, models, optimizers, schedulers)` (optional): `accelerator.prepare` for several networks.
    - `step(run, data, models, optimizers, schedulers, loss_fn)` (optional): a `loop.StepFn` replacing the default
      accumulate / clip / step (the GAN's discriminator-then-generator alternation).
    - `checkpoint_state(data)` / `load_checkpoint_state(data, state, checkpoint)` (optional): extra JSON state for
      resuming.
    - `preferences(run)`, `sequence_logps(model, batch)` and `precompute_reference(run, data, reference)`
      (optional): preference pairs, per-sequence log-probabilities, and the data with the reference's log-probs
      computed once, for `align`.
    - `load_clip_scorer(model_name_or_path)` (optional): (per-clip loss function of waveforms, its sample rate),
      for `--difficulty_method model_loss`.
    - `stages`: the stages it can run; any other is refused before any work.
    - `text_conditioned`: it reads the config's text section (`--text_column`, `--condition_dropout` ...); a
      family that does not refuses those flags.
    - `streams`: it trains on `--streaming` data (its `preprocess` and `batches` take a `ShardStream` as train).
    - `model_card`: the model card's description and loading snippet (`hub.ModelCardText`).
    - `lora_target_modules`: the modules `--use_peft` adapts when `--lora_target_modules` is not given.
    """

    name: str
    stages: tuple[str, ...]
    preprocess: Callable[..., Any]
    build_model: Callable[..., dict[str, Any]]
    batches: Callable[..., Any]
    loss: Callable[..., Any]
    evaluate: Callable[..., Any]
    flops_per_item: Callable[..., float]
    export: Callable[..., None]
    load_export: Callable[..., Any]
    describe: Callable[..., str]
    headline: tuple[str, str] = ("eval/loss", "validation loss")
    checkpoint_files: Callable[..., None] | None = None
    optimizers: Callable[..., Any] | None = None
    prepare: Callable[..., Any] | None = None
    step: Callable[..., Any] | None = None
    checkpoint_state: Callable[..., dict] | None = None
    load_checkpoint_state: Callable[..., None] | None = None
    preferences: Callable[..., Any] | None = None
    sequence_logps: Callable[..., Any] | None = None
    precompute_reference: Callable[..., Any] | None = None
    load_clip_scorer: Callable[..., Any] | None = None
    model_card: Any = None  # hub.ModelCardText: what the model card says and how it loads (unset: by stage)
    text_conditioned: bool = False
    streams: bool = False  # trains on --streaming data: its preprocess and batches take a ShardStream as train
    lora_target_modules: str = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"
