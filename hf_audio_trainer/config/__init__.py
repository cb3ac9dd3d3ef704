"""Run configuration: a stage's config is the sections every stage shares, the stage's own and the chosen model
family's (`composition`), read from YAML files, command-line flags and dicts (`parsing`).

A setting lives with the code that reads it (`optim.OptimConfig`, `ema.EMAConfig`, a family's own sections ...);
this package only composes a stage's sections and parses values into them.
"""

from hf_audio_trainer.config.composition import (
    STAGES,
    AlignConfig,
    CodecConfig,
    FinetuneConfig,
    PretrainConfig,
    StageConfig,
    flags,
    for_family,
    sections,
    stage_config,
)
from hf_audio_trainer.config.parsing import (
    RECIPE_CONFIGS,
    config_from_dict,
    family_in,
    load_yaml,
    parse_config,
    recipe_yaml,
    resolve_config,
)
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families import FAMILIES

__all__ = [
    "RECIPE_CONFIGS",
    "STAGES",
    "AlignConfig",
    "CodecConfig",
    "ConfigError",
    "FinetuneConfig",
    "PretrainConfig",
    "StageConfig",
    "config_from_dict",
    "family_in",
    "flags",
    "for_family",
    "load_yaml",
    "parse_config",
    "recipe_yaml",
    "resolve_config",
    "sections",
    "stage_config",
]


def __getattr__(name: str):
    # a composed class by its name (pickle finds it here); the sections' old home (they live with their code now)
    stage, _, family = name.partition("__")
    by_name = {cls.__name__: cls for cls in STAGES.values()}
    if family and stage in by_name:
        return for_family(by_name[stage], family)
    for config_cls in STAGES.values():
        for family in FAMILIES:
            if config_cls.stage in FAMILIES[family].stages:
                for section in sections(for_family(config_cls, family)).values():
                    if section.__name__ == name:
                        return section
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
