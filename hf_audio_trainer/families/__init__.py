"""Model families: everything a stage needs to know about one kind of model, as plain functions (`Family`).

A stage (`stages/`) runs the same skeleton for every family and asks the family for what differs: how audio becomes
what the model reads, how the model is built, batched, scored and exported. The loop (`loop.py`) knows no family at
all. Adding a family is one module in this package and one entry in `FAMILIES` (README: "Adding a model family").
"""

from __future__ import annotations

from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families.base import Family
from hf_audio_trainer.families.encodec_gan import ENCODEC_GAN
from hf_audio_trainer.families.flow import FLOW
from hf_audio_trainer.families.musicgen import MUSICGEN
from hf_audio_trainer.families.musicgen_text import MUSICGEN_TEXT

FAMILIES: dict[str, Family] = {
    "musicgen": MUSICGEN,
    "musicgen_text": MUSICGEN_TEXT,
    "encodec_gan": ENCODEC_GAN,
    "flow": FLOW,
}


def family_for(name: str, stage: str) -> Family:
    """The family called `name`, checked to run `stage`; an unknown name lists the valid ones."""
    if name not in FAMILIES:
        raise ConfigError(f"model_family={name!r}: choose one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    if stage not in family.stages:
        able = [n for n, f in FAMILIES.items() if stage in f.stages]
        raise ConfigError(
            f"the {name} family cannot run the {stage} stage (it runs {', '.join(family.stages)}); "
            f"--model_family {' or '.join(able)} can"
        )
    return family


__all__ = ["FAMILIES", "Family", "family_for"]
