"""Reading a stage's config: the recipe's YAML file, the user's own (`--config`), command-line flags and dicts.

Every field is a flag with the name Hugging Face users already know (`--learning_rate`, `--save_steps` ...). The
recipe's YAML file (`recipes/configs/<stage>[_<family>].yaml`) sets the defaults of the CLI and of the notebook
functions alike; the user's own YAML file (flat or grouped by section) replaces it; flags and dict keys override both
(TRL's rule). `--model_family` is read first: it decides which sections there are. A flag of another family is refused
by name; an optional setting's `none` switches it off.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_audio_trainer.config.composition import PretrainConfig, StageConfig, flags, for_family, sections
from hf_audio_trainer.errors import ConfigError, MissingError
from hf_audio_trainer.families import FAMILIES, family_of_checkpoint

RECIPE_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"  # the recipes' default YAML files
NONE = ("none", "null")  # what switches an optional setting off, on the command line or in a YAML file
# what a family says to a flag of another family's section (a section may word it its own way: `refusal`)
REFUSAL = "{flags}: the {family} family does not read them; they are {owners} (--model_family {owner})"


def family_in(values: dict[str, Any]) -> str | None:
    """The model family a dict of settings names (flat, or under its `model` section), if any."""
    return _value_in(values, "model_family")


def _value_in(values: dict[str, Any], key: str) -> Any:
    """A setting of a flat or sectioned dict, if there."""
    sectioned = [v[key] for v in values.values() if isinstance(v, dict) and key in v]
    return values.get(key, sectioned[0] if sectioned else None)


def recipe_family(recipe: dict[str, Any]) -> str | None:
    """The model family a recipe's defaults imply: what its default starting model's own class says, when that folder
    is here (only a name the user gave may be a Hub id), else its model_family."""
    default = _value_in(recipe, "model_name_or_path")
    found = family_of_checkpoint(default) if default is not None and Path(default).is_dir() else None
    return found or family_in(recipe)


def recipe_yaml(stage: str, family: str | None, default_yaml: str | os.PathLike | None = None) -> Path | None:
    """The recipe's defaults for a stage and family: `<stage>_<family>.yaml` beside the stage's own file when there is
    one (the flow family's settings differ from the language models'), else the stage's own (None if missing)."""
    path = Path(default_yaml) if default_yaml is not None else RECIPE_CONFIGS / f"{stage}.yaml"
    own = path.with_name(f"{path.stem}_{family}.yaml") if family else None
    if own is not None and own.is_file():
        return own
    return path if path.is_file() else None


def _owned_elsewhere(names: list[str], config_cls: type, family: str) -> str | None:
    """The refusal for flags that belong to other families' sections of this stage, or None."""
    owners: dict[str, list[tuple[str, type]]] = {}
    for other, spec in FAMILIES.items():
        if other != family and config_cls.stage in spec.stages:
            for section in sections(for_family(config_cls, other)).values():
                own = {f.name for f in dataclasses.fields(section)}
                for name in (name for name in names if name in own):
                    owners.setdefault(name, []).append((other, section))
    if not owners:
        return None
    first = next(iter(owners.values()))
    section, families = first[0][1], [other for other, _ in first]
    given = [f"--{name}" for name, found in owners.items() if found[0][1] is section]
    whose = f"the {families[0]} family's" if len(families) == 1 else f"the {' and '.join(families)} families'"
    refusal = getattr(section, "refusal", REFUSAL)
    return refusal.format(flags=", ".join(given), family=family, owner=families[0], owners=whose)


def _flatten(values: dict[str, Any], cls: type, source: str, user: bool = True) -> dict[str, Any]:
    """Accept both `{learning_rate: 1e-3}` and `{optim: {learning_rate: 1e-3}}` (any section's name: no flag takes a
    mapping). Keys of another family's sections are refused when the user set them and dropped from a recipe's
    defaults; an unknown key is an error either way. An optional setting's `none` / `null` becomes None."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    known = flags(cls)
    unknown = [key for key in flat if key not in known]
    for key in unknown:
        if _owned_elsewhere([key], cls, cls.family) is None:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
    if unknown and user:
        raise ConfigError(_owned_elsewhere(unknown, cls, cls.family))
    optional = optional_flags(cls)
    return {k: None if k in optional and str(v).lower() in NONE else v for k, v in flat.items() if k in known}


def optional_flags(config_cls: type) -> set[str]:
    """The flags that may be None (read from the annotations: HfArgumentParser rewrites a field's `type` in place)."""
    hints = [typing.get_type_hints(section) for section in sections(config_cls).values()]
    return {name for hint in hints for name, kind in hint.items() if type(None) in typing.get_args(kind)}


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name X` or `--name=X` in argv, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _without_nones(argv: list[str], optional: set[str]) -> tuple[list[str], dict[str, None]]:
    """argv without `--x none` / `--x=none` of optional settings, and those settings as None."""
    kept, nones, i = [], {}, 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if name in optional:
            if eq and value.lower() in NONE:
                nones[name], i = None, i + 1
                continue
            if not eq and i + 1 < len(argv) and argv[i + 1].lower() in NONE:
                nones[name], i = None, i + 2
                continue
        kept.append(argv[i])
        i += 1
    return kept, nones


def _parser(cls: type) -> HfArgumentParser:
    """One parser over the config's sections, a titled group each (the stage's and the family's first)."""
    shared = set(sections(StageConfig))
    ordered = sorted(sections(cls).items(), key=lambda item: item[0] in shared)
    for name, section in ordered:
        section._argument_group_name = f"{name}: {(section.__doc__ or '').strip().splitlines()[0]}"
    parser = HfArgumentParser(
        [section for _, section in ordered],
        allow_abbrev=False,  # no silent prefix matches
        description=f"{cls.__doc__} Model family: {cls.family} (--model_family NAME --help lists another's flags).",
    )
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
        help="Your own YAML file of settings (flat or by section); it replaces the recipe's, and flags override it.",
    )  # fmt: skip
    return parser


def parse_config(argv: list[str] | None = None, config_cls: type = PretrainConfig, default_yaml: str | None = None):
    """Parse `--config file.yaml` plus flags (flags win) into a validated run config of the chosen family;
    `default_yaml` is the recipe's file (its `<stage>_<family>.yaml` variant when the family has one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    user_yaml, source = {}, "--config"
    config_arg = next((a for a in argv if a == "--config" or a.startswith("--config=")), None)
    if config_arg is not None:  # the user's own file replaces the recipe's
        i = argv.index(config_arg)
        source = config_arg.split("=", 1)[1] if "=" in config_arg else (argv[i + 1] if i + 1 < len(argv) else None)
        if not source:
            raise ConfigError("--config needs a YAML file path")
        user_yaml = load_yaml(source)
        del argv[i : i + (1 if "=" in config_arg else 2)]
    given = _flag_value(argv, "model_family") or family_in(user_yaml)
    model = _flag_value(argv, "model_name_or_path") or _value_in(user_yaml, "model_name_or_path")
    family = family_of_checkpoint(model, given) if model is not None else given
    recipe_file = recipe_yaml(config_cls.stage, family, default_yaml) if default_yaml and not config_arg else None
    recipe = load_yaml(recipe_file) if recipe_file is not None else {}
    if family is None and (family := recipe_family(recipe)) is not None and recipe_file is not None:
        recipe_file = recipe_yaml(config_cls.stage, family, default_yaml)  # the family's own file, if it has one
        recipe = load_yaml(recipe_file)
    cls = for_family(config_cls, family or config_cls.default_family)
    known = flags(cls)
    defaults = _flatten(recipe, cls, str(recipe_file), user=False)
    user = _flatten(user_yaml, cls, source)
    argv, nones = _without_nones(argv, optional_flags(cls))
    parser = _parser(cls)
    # the family chosen (by a checkpoint's class, the recipe's file or the stage) is the model section's default
    stage_defaults = {k: v for k, v in {**cls.stage_defaults, "model_family": cls.family}.items() if k in known}
    parser.set_defaults(**{**stage_defaults, **defaults, **user, **nones})
    *parsed, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        names = [a[2:].split("=")[0] for a in unknown if a.startswith("--")]
        elsewhere = _owned_elsewhere(names, cls, cls.family)
        if elsewhere is not None:
            raise ConfigError(elsewhere)
        hints = [f"--{m[0]}" for name in names if (m := difflib.get_close_matches(name, known, n=1))]
        raise ConfigError(f"unknown arguments {unknown}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")} | set(nones)
    given |= {name[3:] for name in given if name.startswith("no_") and name[3:] in known}  # --no_x sets x
    order = sorted(sections(cls), key=lambda name: name in sections(StageConfig))  # as the parser lists them
    return cls(
        **dict(zip(order, parsed, strict=True)),
        user_set=frozenset((given & set(known)) | set(user)),
        defaults={**stage_defaults, **defaults},
    )


def config_from_dict(
    values: dict[str, Any], config_cls: type = PretrainConfig, source: str = "overrides", defaults: dict | None = None
):
    """Build a run config from a flat or sectioned dict (what the user set) over `defaults` (flat), validating every
    section."""
    family = family_in(values) or family_in(defaults or {}) or config_cls.family or config_cls.default_family
    cls = for_family(config_cls, family)
    user = _flatten(values, cls, source)
    known = flags(cls)
    stage = {**cls.stage_defaults, "model_family": cls.family}  # the family chosen is the model section's default
    base = {k: v for k, v in {**stage, **(defaults or {})}.items() if k in known}
    flat = {**base, **user}
    built = {}
    for name, section in sections(cls).items():
        own = {f.name for f in dataclasses.fields(section)}
        built[name] = section(**{k: v for k, v in flat.items() if k in own})
    return cls(**built, user_set=frozenset(user), defaults=base)


def resolve_config(config, config_cls: type = PretrainConfig):
    """Accept a config object, a dict of overrides or a YAML path (the notebook entry points use this). A dict starts
    from the recipe's YAML file, exactly as the command line does; a YAML path is the user's own file, like
    `--config`."""
    if isinstance(config, config_cls):
        return config
    if isinstance(config, (str, os.PathLike)):  # the user's own file: every value in it is theirs
        return config_from_dict(load_yaml(config), config_cls, source=str(config))
    if config is None:
        config = {}
    if not isinstance(config, dict):
        kind = type(config)
        raise TypeError(f"config must be a {config_cls.__name__}, a dict of overrides or a YAML path, not {kind}")
    model = _value_in(config, "model_name_or_path")
    family = family_of_checkpoint(model, family_in(config)) if model is not None else family_in(config)
    recipe_file = recipe_yaml(config_cls.stage, family)
    recipe = load_yaml(recipe_file) if recipe_file is not None else {}
    if family is None and (family := recipe_family(recipe)) is not None:
        recipe_file = recipe_yaml(config_cls.stage, family)
        recipe = load_yaml(recipe_file) if recipe_file is not None else {}
    cls = for_family(config_cls, family or config_cls.default_family)
    return config_from_dict(config, cls, defaults=_flatten(recipe, cls, str(recipe_file), user=False))


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file, with a clear error when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"config file {path} does not exist; pass the path of a YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem}); fix the file at that line") from None
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values, not a {kind}")
    return values
