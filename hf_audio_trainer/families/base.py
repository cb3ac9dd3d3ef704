"""What a model family is: the functions a stage asks for, in one frozen dataclass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hf_audio_trainer.errors import check


def class_of(index: dict) -> str | None:
    """The class a checkpoint's model_index.json (`_class_name`) or config.json (`architectures`) names."""
    return index.get("_class_name") or next(iter(index.get("architectures") or []), None)


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints a family trains from: what they are (for the refusal that lists every family's) and the test
    on a checkpoint's model_index.json or config.json."""

    description: str
    claims: Callable[[dict], bool]

    @classmethod
    def of_class(cls, name: str) -> Checkpoints:
        """Every checkpoint of the class `name`."""
        return cls(name, lambda index: class_of(index) == name)


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
    - `frozen_files(run, data, models, folder)` (optional): the family's frozen parts and the files that make a model
      folder of the weights (a pipeline's text encoder, tokenizer, VAE and scheduler; a model's config and
      processor). The run stores them once, in its `frozen/` folder, with the weights no checkpoint holds (frozen
      parameters: a LoRA's base, a frozen T5 or codec inside the model); a resumed run's `preprocess` finds them at
      `run.frozen`, and `best/` joins them in. A checkpoint holds only what trains.
    - `checkpoint_files(run, data, models, folder)` (optional): files every checkpoint needs beside what trains
      (none of the built-in families has any: what does not change belongs in `frozen_files`).
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
    - `sections`: the family's own config sections by name (dataclasses: `help` on each field, checks in
      `__post_init__`), added to every stage it runs, or to those a section's `stages` class variable names. A
      stage's config is its shared sections plus these; a flag of another family's section is refused by name.
    - `check_config(cfg)` (optional): checks across the family's sections and the stage's, when the config is built.
    - `model_sizes`: the sizes `--model_size` may name for a new model (empty: the family has no model section).
    - `checkpoints` (optional): the checkpoints it trains from, recognised by their model_index.json (diffusers) or
      config.json (transformers): `--model_name_or_path` alone then chooses the family.
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
    frozen_files: Callable[..., None] | None = None
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
    sections: dict[str, type] = field(default_factory=dict)
    check_config: Callable[[Any], None] | None = None
    model_sizes: tuple[str, ...] = ()
    checkpoints: Checkpoints | None = None


@dataclass
class ModelConfig:
    """Which model to train."""

    shapes_model: ClassVar[bool] = True  # settings a checkpoint's weights were made with: a resume must match

    model_family: str = field(
        default="musicgen",
        metadata={"help": "The model family (families.FAMILIES); --help after it lists that family's own flags."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A folder or Hub id to start from (the family's export: a transformers or diffusers model folder "
            "such as facebook/musicgen-small); unset: a new model of --model_size."
        },
    )
    model_size: str = field(
        default="tiny", metadata={"help": "Size of a new model: micro, tiny, small or medium (the family's table)."}
    )
    dropout: float | None = field(
        default=None, metadata={"help": "Override the model's dropout (0 makes runs comparable bit for bit)."}
    )

    def __post_init__(self) -> None:
        # the family and the size are checked against FAMILIES when the stage's config is composed
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, f"dropout={self.dropout}: must be in [0, 1)")
