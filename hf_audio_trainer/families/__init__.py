"""Model families: everything a stage needs to know about one kind of model, as plain functions (`Family`).

A stage (`stages/`) runs the same skeleton for every family and asks the family for what differs: how audio becomes
what the model reads, how the model is built, batched, scored and exported. The loop (`loop.py`) knows no family at
all. Adding a family is one module in this package and one entry in `FAMILIES` (README: "Adding a model family").
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families.ace_step import ACE_STEP
from hf_audio_trainer.families.base import Family, class_of
from hf_audio_trainer.families.encodec_gan import ENCODEC_GAN
from hf_audio_trainer.families.flow import FLOW
from hf_audio_trainer.families.musicgen import MUSICGEN
from hf_audio_trainer.families.musicgen_text import MUSICGEN_TEXT
from hf_audio_trainer.families.stable_audio import STABLE_AUDIO
from hf_audio_trainer.families.stable_audio_3 import STABLE_AUDIO_3

FAMILIES: dict[str, Family] = {
    "musicgen": MUSICGEN,
    "musicgen_text": MUSICGEN_TEXT,
    "encodec_gan": ENCODEC_GAN,
    "flow": FLOW,
    "stable_audio": STABLE_AUDIO,
    "stable_audio_3": STABLE_AUDIO_3,
    "ace_step": ACE_STEP,
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


def checkpoint_index(model_name_or_path: str) -> dict | None:
    """A checkpoint's model_index.json (a diffusers pipeline) or config.json (a transformers model), from its folder
    or the Hub; None when it has neither (a run's checkpoint-N, a folder or id that is not there)."""
    for name in ("model_index.json", "config.json"):
        path = Path(model_name_or_path) / name
        if path.is_file():
            return json.loads(path.read_text())
    if Path(model_name_or_path).exists():
        return None
    from huggingface_hub import hf_hub_download

    for name in ("model_index.json", "config.json"):
        try:
            return json.loads(Path(hf_hub_download(str(model_name_or_path), name)).read_text())
        except Exception:  # not a Hub id, no such file, offline: the checkpoint does not say
            continue
    return None


def family_of_checkpoint(model_name_or_path: str, given: str | None = None) -> str | None:
    """The family that trains `model_name_or_path`, read from its own class (None when it does not say). A checkpoint
    no family trains is refused, listing what they train; one that another family trains than `given` (the user's
    --model_family) is refused, naming both. An unknown class with `given` is left to that family's own checks."""
    index = checkpoint_index(model_name_or_path)
    if index is None:
        return given
    claimed = [name for name, family in FAMILIES.items() if family.checkpoints and family.checkpoints.claims(index)]
    scheduler = (index.get("scheduler") or [None, None])[1]
    what = f"{class_of(index)}" + (f" with a {scheduler}" if scheduler else "")
    if given is not None and claimed and given not in claimed:
        raise ConfigError(
            f"--model_family {given}, but {model_name_or_path} is a {what}, which the {claimed[0]} family trains; drop "
            f"--model_family (the checkpoint chooses) or pass --model_family {claimed[0]}"
        )
    if not claimed and given is None:
        trained = "; ".join(f"{f.checkpoints.description} ({n})" for n, f in FAMILIES.items() if f.checkpoints)
        raise ConfigError(
            f"--model_name_or_path {model_name_or_path} is a {what}, which no model family trains; the toolkit trains "
            f"{trained}"
        )
    return given or claimed[0]


__all__ = ["FAMILIES", "Family", "checkpoint_index", "family_for", "family_of_checkpoint"]
