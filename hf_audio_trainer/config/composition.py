"""What a stage's config is: the sections every stage shares, the stage's own, and the chosen model family's.

A setting lives with the code that reads it: `optim.py` declares `OptimConfig`, `ema.py` `EMAConfig`, a family its own
sections (`Family.sections`), and so on. Here they are composed: `StageConfig` holds the shared sections and what
spans them (defaults fitted to the run's length, the flat view for logs and checkpoints), each stage's class adds its
own sections and checks, and `for_family` adds a family's. Constructing a stage's class directly builds the class
composed for the family its model section names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

from hf_audio_trainer.alignment import DPOConfig
from hf_audio_trainer.checkpoint import CheckpointConfig
from hf_audio_trainer.data.audio import DataConfig
from hf_audio_trainer.data.preferences import PreferenceDataConfig
from hf_audio_trainer.difficulty import CurriculumConfig
from hf_audio_trainer.ema import EMAConfig
from hf_audio_trainer.errors import check
from hf_audio_trainer.families import FAMILIES, family_for
from hf_audio_trainer.families.base import ModelConfig
from hf_audio_trainer.hub import HubConfig
from hf_audio_trainer.loop import TrainingConfig
from hf_audio_trainer.models import FinetuneOptions
from hf_audio_trainer.optim import OptimConfig
from hf_audio_trainer.samples import SamplesConfig
from hf_audio_trainer.trackers import LoggingConfig


def sections(config_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a run config class."""
    return {
        f.name: f.default_factory
        for f in dataclasses.fields(config_cls)
        if f.default_factory is not MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def stage_config(cls: type) -> type:
    """Make a stage's config class a dataclass whose flags each belong to exactly one of its sections: one name,
    one meaning. A flag in two sections is refused here, when the class is defined, so a flat key (a flag, a YAML
    key) can never silently set two settings."""
    cls = dataclass(cls)
    owners: dict[str, str] = {}
    for section, section_cls in sections(cls).items():
        for f in dataclasses.fields(section_cls):
            if f.name in owners:
                raise TypeError(
                    f"{cls.__name__}: flag --{f.name} is in both its {owners[f.name]} and {section} sections; "
                    "a flag belongs to one section of a stage (rename one)"
                )
            owners[f.name] = section
    return cls


def flags(config_cls: type) -> dict[str, dataclasses.Field]:
    """Flag name -> its field, over every section of a config class."""
    return {f.name: f for cls in sections(config_cls).values() for f in dataclasses.fields(cls)}


@dataclass
class StageConfig:
    """What every stage's config shares: the shared sections, defaults fitted to the run, a flat view for logs.

    A stage's own class adds its sections; `for_family` adds the chosen family's (constructing a stage's class
    directly builds the composed one for the family its model section names). `user_set` names the flags the user
    gave (on the command line, in their own `--config` file or in the dict a notebook passes); everything else is a
    default (the sections', the stage's, the recipe's YAML file). A value the user set is refused when it does not
    fit; a default that does not fit the run is adjusted, and `notes` says how, for the stage to print.
    """

    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    user_set: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    # the flat defaults this run started from (stage defaults + the recipe's YAML); `max_steps` scales run lengths
    defaults: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    notes: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    stage: ClassVar[str] = ""
    default_family: ClassVar[str] = "musicgen"
    family: ClassVar[str | None] = None  # set on the class composed for one family
    # whether the stage can batch by duration (--max_tokens_per_batch): the code-sequence stages can
    batches_by_duration: ClassVar[bool] = False
    # flag -> value defaults of this stage that differ from the sections' own (subclasses override)
    stage_defaults: ClassVar[dict[str, Any]] = {}

    def __new__(cls, *args, **kwargs):
        if cls.family is None:  # a stage's own class: the one composed for the family its model section names
            cls = for_family(cls, getattr(kwargs.get("model"), "model_family", None) or cls.default_family)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        family = FAMILIES[self.family]
        model = getattr(self, "model", None)
        check(
            getattr(model, "model_family", self.family) == self.family,
            f"model_family={getattr(model, 'model_family', None)!r} in a config composed for the {self.family} "
            f"family; build it with config.for_family(..., {getattr(model, 'model_family', None)!r})",
        )
        if family.model_sizes and hasattr(model, "model_size"):
            size = model.model_size
            check(size in family.model_sizes, f"model_size={size!r}: choose one of {sorted(family.model_sizes)}")
        check(
            self.training.max_tokens_per_batch is None or self.batches_by_duration,
            f"--max_tokens_per_batch: the {self.stage} stage batches a fixed number of examples; use "
            "--per_device_train_batch_size",
        )
        self.check()
        if family.check_config is not None:
            family.check_config(self)
        if self.optim.learning_rate == 0:
            self.notes.append("learning_rate=0: the weights will not change (a check that the pipeline runs)")
        t = self.training
        if "num_train_epochs" in self.user_set and "max_steps" not in self.user_set and t.max_steps > 0:
            self.notes.append(f"num_train_epochs={t.num_train_epochs:g}: the run is that long (not the default "
                              f"max_steps={t.max_steps})")  # fmt: skip
            t.max_steps = -1
        if t.max_steps > 0:
            self.fit_to_run(t.max_steps)

    def check(self) -> None:
        """The stage's own checks across its sections (subclasses override)."""

    def fit_to_run(self, max_steps: int) -> list[str]:
        """Check the settings counted in steps (each section's `run_length`) against the run's length (known here, or
        once the data sets it from --num_train_epochs): refuse one the user set, scale a default to the run. Returns
        the notes it added."""
        added = []
        default_run = self.defaults.get("max_steps", -1)
        for section_name, section_cls in sections(type(self)).items():
            section = getattr(self, section_name)
            for name, refusal in getattr(section_cls, "run_length", {}).items():
                value = getattr(section, name)
                if value <= max_steps:
                    continue
                check(name not in self.user_set, refusal.format(value=value, steps=max_steps))
                # the same fraction of this run as of the default one (a tenth when no default length is known)
                fitted = value * max_steps // default_run if 0 < value <= default_run else max_steps // 10
                setattr(section, name, fitted)
                of = f" of the default {default_run}" if 0 < value <= default_run else ""
                added.append(
                    f"{name}: the default {value}{of} is longer than this {max_steps}-step run; using {fitted}"
                )
        self.notes.extend(added)
        return added

    def to_flat_dict(self) -> dict[str, Any]:
        """All fields as one flat dict (flag name -> value), e.g. for tracker hyperparameters; never the token."""
        flat = {k: v for section in sections(type(self)) for k, v in dataclasses.asdict(getattr(self, section)).items()}
        flat.pop("hub_token", None)
        return flat

    def model_settings(self) -> list[str]:
        """The flags of the sections that shape the networks (`shapes_model`): what a resumed run must keep."""
        return [f.name for cls in sections(type(self)).values() if getattr(cls, "shapes_model", False)
                for f in dataclasses.fields(cls)]  # fmt: skip


def check_data_at_scale(cfg: PretrainConfig | FinetuneConfig) -> None:
    """Streaming, duration batching and the curriculum, as far as they can go together."""
    data, curriculum, training = cfg.data, cfg.curriculum, cfg.training
    if data.streaming:
        check(cfg.stage == "pretrain", "--streaming is for pretraining on large data; fine-tune on a loaded dataset")
        check(
            curriculum.curriculum == "none"
            and curriculum.difficulty_method is None
            and curriculum.max_difficulty is None
            and not curriculum.high_quality_only,
            "--curriculum, --difficulty_method, --max_difficulty and --high_quality_only need every clip's scores "
            "before training, which a stream does not have; drop them with --streaming (or load the dataset)",
        )
        check(
            training.max_tokens_per_batch is None,
            "--max_tokens_per_batch with --streaming is not supported; use --per_device_train_batch_size",
        )
    check(
        not curriculum.curriculum_segments or curriculum.curriculum not in ("none", "anti"),
        "--curriculum_segments grows the window with --curriculum's pacing; set --curriculum linear "
        "(or root, geometric, step)",
    )
    check(
        curriculum.curriculum == "none" or curriculum.curriculum_segments or training.max_tokens_per_batch is None,
        "--max_tokens_per_batch with a difficulty --curriculum is not supported (the curriculum draws a fixed number "
        "of clips per step); use one of them, or --curriculum_segments",
    )


@stage_config
class PretrainConfig(StageConfig):
    """Pretraining: a model of the chosen family learns from large, diverse data (optionally easiest first)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    stage: ClassVar[str] = "pretrain"
    batches_by_duration: ClassVar[bool] = True

    def check(self) -> None:
        check_data_at_scale(self)


@stage_config
class FinetuneConfig(StageConfig):
    """A fine-tune: a pretrained model (folder or Hub id) on the high-quality rows, gentler optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    stage: ClassVar[str] = "finetune"
    batches_by_duration: ClassVar[bool] = True
    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/finetune",
        "high_quality_only": True,
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "label_smoothing": 0.1,
    }

    def check(self) -> None:
        check_data_at_scale(self)
        check(
            self.model.model_name_or_path is not None,
            "finetune starts from a pretrained model: pass --model_name_or_path (a pretrain output folder or Hub id)",
        )


@stage_config
class AlignConfig(StageConfig):
    """Preference optimisation (DPO family) of a fine-tuned model against a frozen reference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    stage: ClassVar[str] = "align"
    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/align",
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "dropout": 0.0,  # TRL disables dropout for DPO: policy and reference log-probs must be comparable
        "per_device_train_batch_size": 8,
        "metric_for_best_model": "eval/rewards/accuracies",
        "greater_is_better": True,
    }

    def check(self) -> None:
        check(
            self.model.model_name_or_path is not None,
            "align starts from a fine-tuned model: pass --model_name_or_path (a finetune output folder or Hub id)",
        )


@stage_config
class CodecConfig(StageConfig):
    """Train an EnCodec-style codec with discriminators; its output folder is a tokenizer for pretrain."""

    stage: ClassVar[str] = "codec"
    default_family: ClassVar[str] = "encodec_gan"
    stage_defaults: ClassVar[dict[str, Any]] = {
        "output_dir": "outputs/codec",
        "learning_rate": 1e-3,
        "adam_beta1": 0.8,  # optim.GAN_BETAS: a short memory keeps up with the opponent
        "adam_beta2": 0.99,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant_with_warmup",
        "per_device_train_batch_size": 8,
        "fad_embedder": "mel",
        "num_eval_samples": 100,
        "metric_for_best_model": "eval/mel_distance",
    }


STAGES = {cls.stage: cls for cls in (PretrainConfig, FinetuneConfig, AlignConfig, CodecConfig)}
_COMPOSED: dict[tuple[type, str], type] = {}


def for_family(config_cls: type, family: str) -> type:
    """The stage's config class for model family `family`: the stage's sections plus the family's (those whose
    `stages` include this stage). An unknown family, or one that cannot run the stage, is refused by name."""
    base = STAGES[config_cls.stage]
    family_for(family, base.stage)
    if (base, family) not in _COMPOSED:
        own = {name: section for name, section in FAMILIES[family].sections.items()
               if base.stage in getattr(section, "stages", (base.stage,))}  # fmt: skip
        name = f"{base.__name__}__{family}"
        namespace = {name_: field(default_factory=section) for name_, section in own.items()}
        # named in the package, whose __getattr__ builds it again in another process (pickle)
        namespace.update(__annotations__=dict.fromkeys(own, "type"), __doc__=base.__doc__, __module__=__package__)
        cls = type(name, (base,), {**namespace, "family": family, "__qualname__": name})
        _COMPOSED[base, family] = stage_config(cls)
    return _COMPOSED[base, family]
