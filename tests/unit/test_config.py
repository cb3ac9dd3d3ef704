import pytest

from hf_audio_trainer.config import (
    AlignConfig,
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    parse_config,
    resolve_config,
)
from tests.helpers import ROOT


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 2.0e-3\ntraining:\n  max_steps: 7\n  seed: 4\nlogging_steps: 3\n")
    cfg = parse_config(["--config", str(path), "--max_steps", "11", "--dropout", "0"])
    assert cfg.optim.learning_rate == 2e-3  # from YAML (sectioned)
    assert cfg.logging.logging_steps == 3  # from YAML (flat)
    assert cfg.training.max_steps == 11  # flag beats YAML
    assert cfg.training.seed == 4
    assert cfg.model.dropout == 0.0


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    # PyYAML reads 3e-4 as a string; the flag's type turns it back into a float
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\n")
    assert parse_config(["--config", str(path)]).optim.learning_rate == pytest.approx(3e-4)


def test_dict_and_yaml_path_entry_points(tmp_path):
    cfg = resolve_config({"max_steps": 5, "optim": {"warmup_steps": 2}})
    assert isinstance(cfg, PretrainConfig) and cfg.training.max_steps == 5 and cfg.optim.warmup_steps == 2
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 9\n")
    assert resolve_config(str(path)).training.max_steps == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": -1.0}, "learning_rate=-1.0: must be > 0"),
        ({"save_steps": 0}, "save_steps=0: must be >= 1"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
        ({"lr_scheduler_type": "cosinus"}, "lr_scheduler_type='cosinus'"),
        ({"learning_rat": 1e-3}, "unknown config key 'learning_rat'.*did you mean 'learning_rate'"),
        ({"optim": "sgdx"}, "optim='sgdx': choose one of"),
        ({"report_to": "tensorbored"}, "unknown tracker 'tensorbored'"),
        ({"model_size": "huge"}, "model_size='huge'"),
        ({"ema_decay": 0.0}, r"ema_decay=0.0: must be in \(0, 1\)"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0: must be in \(0, 1\)"),
        ({"max_steps": 10, "warmup_steps": 11}, "warmup_steps=11 is longer than max_steps=10"),
        ({"adam_beta2": 1.0}, r"adam_beta2=1.0: must be in \[0, 1\)"),
        ({"hessian_update_period": 0}, "hessian_update_period=0: must be >= 1"),
    ],
)
def test_bad_values_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(overrides)


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("warmup_step: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'warmup_step' in .*bad.yaml.*'warmup_steps'"):
        parse_config(["--config", str(path)])


def test_unknown_flag_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown arguments \['--save_step', '5'\]; did you mean --save_steps"):
        parse_config(["--save_step", "5"])


def test_report_to_none_means_no_trackers():
    assert config_from_dict({"report_to": "none"}).logging.trackers == []
    assert config_from_dict({"report_to": "tensorboard,wandb"}).logging.trackers == ["tensorboard", "wandb"]


@pytest.mark.parametrize(
    ("stage", "cls"), [("pretrain", PretrainConfig), ("finetune", FinetuneConfig), ("align", AlignConfig)]
)
def test_every_recipe_cli_parses_its_yaml_and_help(stage, cls):
    # one parser over all sections: a flag name defined twice would fail here, not in a user's launch
    yaml_path = ROOT / "recipes" / "configs" / f"{stage}.yaml"
    cfg = parse_config(["--label_smoothing", "0.05", "--max_steps", "77"], cls, str(yaml_path))
    assert cfg.training.max_steps == 77
    smoothing = cfg.dpo.label_smoothing if stage == "align" else cfg.loss.label_smoothing
    assert smoothing == 0.05
