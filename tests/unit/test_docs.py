"""The documentation: the options reference is generated from the config dataclasses (docs/hooks.py) and names every
flag of every stage and family; the README stays a front page."""

import importlib.util

from hf_audio_trainer.config import STAGES, flags, for_family
from hf_audio_trainer.families import FAMILIES
from tests.helpers import ROOT


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_options_reference_names_every_flag_of_every_stage_and_family():
    hooks = load_hooks()
    page = (ROOT / "docs" / "reference" / "options.md").read_text()
    assert hooks.MARKER in page
    built = hooks.on_page_markdown(page, None, None, None)
    assert hooks.MARKER not in built
    missing = {
        (stage, family, name)
        for stage, config_cls in STAGES.items()
        for family, spec in FAMILIES.items()
        if stage in spec.stages
        for name in flags(for_family(config_cls, family))
        if f"| `--{name}` |" not in built
    }
    assert missing == set()
    # each flag's own help is in its row, so a renamed or re-documented field shows up in the reference
    assert "| `--latent_hop_length` | `64` | Samples per latent frame" in built
    assert "| `--fad_embedder` | none (or none) |" not in built and "| `--fad_embedder` | none |" in built


def test_the_readme_is_a_front_page_with_the_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) < 200
    marker = readme.index("<!-- test-command -->")
    assert readme[marker + 2].endswith(".venv/bin/python -m pytest -q")
