"""MkDocs hooks (`hooks:` in mkdocs.yml): the options reference, generated from the config dataclasses.

`docs/reference/options.md` holds the marker `<!-- options-tables -->`; `on_page_markdown` replaces it with one table
per config section (every flag of every stage and family: its default and its `help`), so the reference cannot
drift from the code. `options_markdown()` is importable without MkDocs (tests/unit/test_docs.py checks that every flag
of every stage and family is in it).
"""

from __future__ import annotations

import dataclasses
import typing

MARKER = "<!-- options-tables -->"


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    return "none" if value is None else f"`{value}`"


def _table(section: type) -> list[str]:
    hints = typing.get_type_hints(section)
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(section):
        default = _default(f)
        if type(None) in typing.get_args(hints[f.name]) and default != "none":
            default += " (or none)"  # an optional setting the command line can switch off
        text = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `--{f.name}` | {default} | {text} |")
    return lines


def _title(name: str, section: type) -> str:
    return f"### `{name}`: {(section.__doc__ or '').strip().splitlines()[0]}"


def options_markdown() -> str:
    """Every section of every stage and family: the shared ones, each stage's own, then each family's (a section
    that serves several is tabled once, where it first appears)."""
    from hf_audio_trainer.config import STAGES, StageConfig, for_family, sections
    from hf_audio_trainer.families import FAMILIES

    shown: dict[type, str] = {}

    def section_lines(name: str, section: type, where: str, note: str = "") -> list[str]:
        if section in shown:
            return [f"### `{name}`", "", f"{note}The same section as {shown[section]}'s.", ""]
        shown[section] = where
        return [_title(name, section), "", *([note.strip(), ""] if note else []), *_table(section), ""]

    shared = sections(StageConfig)
    out = [
        "The defaults below are the sections' own; each recipe's YAML file (`recipes/configs/`) sets its own over",
        "them, and `python recipes/<stage>.py [--model_family NAME] --help` shows the defaults a run starts from.",
        "",
        "## Every stage",
        "",
        "Every stage and family reads these sections.",
        "",
    ]
    for name, section in shared.items():
        out += section_lines(name, section, "every stage")
    for stage, config_cls in STAGES.items():
        own = {n: s for n, s in sections(config_cls).items() if n not in shared}
        recipe = f"`recipes/configs/{stage}.yaml`"
        out += [f"## `{stage}`", "", f"`recipes/{stage}.py`; its defaults: {recipe}."]
        if config_cls.stage_defaults:
            given = ", ".join(f"`{k}={v}`" for k, v in config_cls.stage_defaults.items())
            out += ["", f"The stage's own defaults (where it differs from the tables): {given}."]
        out.append("")
        for name, section in own.items():
            out += section_lines(name, section, f"`{stage}`")
    for family, spec in FAMILIES.items():
        runs = [stage for stage, config_cls in STAGES.items() if stage in spec.stages]
        out += [f"## Family `{family}`", "", f"Runs {', '.join(f'`{s}`' for s in runs)} (`--model_family {family}`)."]
        if spec.model_sizes:
            out += ["", f"`--model_size`: {', '.join(f'`{s}`' for s in spec.model_sizes)}."]
        if "finetune" in runs:
            lora = f"`--use_peft` adapts `{spec.lora_target_modules}` unless `--lora_target_modules` names others."
            out += ["", lora]
        mine = {}
        for stage in runs:
            base = sections(STAGES[stage])
            for name, section in sections(for_family(STAGES[stage], family)).items():
                if name not in base:
                    mine.setdefault((name, section), []).append(stage)
        out.append("" if mine else "\nIt adds no section of its own.")
        for (name, section), stages in mine.items():
            note = f"In {', '.join(f'`{s}`' for s in stages)}. "
            out += section_lines(name, section, f"`{family}`", note)
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    """The options page with its tables; every other page unchanged."""
    return markdown.replace(MARKER, options_markdown()) if MARKER in markdown else markdown
