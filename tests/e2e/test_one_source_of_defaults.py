"""The notebook functions and the recipes start from the same defaults (the recipe's YAML file): for the same
overrides, the run_config.json each writes is the same but for output_dir, for every stage and for families other
than a stage's default."""

import json
import runpy

import pytest

from hf_audio_trainer.config import parse_config, resolve_config
from hf_audio_trainer.stages.common import start_run
from tests.helpers import ROOT

# (stage, the overrides, a setting whose recipe default differs from its section's own, and that default)
CASES = [
    ("pretrain", {"max_steps": 7}, ("learning_rate", 3e-3)),
    ("pretrain", {"model_family": "flow", "max_steps": 7}, ("ema", True)),  # pretrain_flow.yaml's
    ("pretrain", {"model_family": "musicgen_text", "tokenizer": "x", "learning_rate": 0.01}, ("warmup_steps", 30)),
    ("finetune", {"model_name_or_path": "x", "max_steps": 3}, ("eval_steps", 50)),
    ("finetune", {"model_family": "flow", "model_name_or_path": "x", "use_peft": True}, ("eval_steps", 50)),
    ("align", {"model_name_or_path": "x", "beta": 0.5}, ("eval_steps", 25)),
    ("align", {"model_family": "musicgen_text", "model_name_or_path": "x"}, ("eval_steps", 25)),
    ("codec", {"max_steps": 6, "fad_embedder": "none"}, ("discriminator_learning_rate", 2e-4)),
]


def written(cfg, stage: str) -> dict:
    """What a run with this config writes to run_config.json (the stage's start writes it, before any work)."""
    with start_run(cfg, stage) as run:
        return json.loads((run.out / "run_config.json").read_text())


@pytest.mark.parametrize(("stage", "overrides", "recipe_default"), CASES,
                         ids=[f"{s}-{o.get('model_family', 'default')}" for s, o, _ in CASES])  # fmt: skip
def test_a_notebook_call_and_the_recipe_write_the_same_run_config(stage, overrides, recipe_default, tmp_path):
    recipe = runpy.run_path(str(ROOT / "recipes" / f"{stage}.py"))  # the recipe's own class and YAML file
    config_cls = next(v for k, v in recipe.items() if k.endswith("Config") and isinstance(v, type))
    flags = [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    cli = parse_config([*flags, "--output_dir", str(tmp_path / "cli")], config_cls, str(recipe["DEFAULT_CONFIG"]))
    notebook = resolve_config({**overrides, "output_dir": str(tmp_path / "notebook")}, config_cls)
    from_cli, from_notebook = written(cli, stage), written(notebook, stage)
    assert from_cli.pop("output_dir") != from_notebook.pop("output_dir")
    assert from_cli == from_notebook
    # both start from the recipe's file, not from the sections' own defaults
    name, value = recipe_default
    assert from_notebook[name] == value
