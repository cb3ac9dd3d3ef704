import pytest

from hf_audio_trainer.config import (
    AlignConfig,
    CodecConfig,
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    parse_config,
    resolve_config,
)
from hf_audio_trainer.errors import ConfigError
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
        ({"learning_rate": -1.0}, "learning_rate=-1.0: must be >= 0"),
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


# --- defaults fitted to the run; only what the user set is refused ---------------------------------------------------

RECIPE_CONFIGS = ROOT / "recipes" / "configs"


def test_a_default_warmup_longer_than_a_short_run_is_scaled_and_said():
    # the recipe's YAML says warmup_steps 30 of 300 steps; the user only asked for 10 steps
    cfg = parse_config(["--max_steps", "10"], PretrainConfig, str(RECIPE_CONFIGS / "pretrain.yaml"))
    assert cfg.optim.warmup_steps == 1  # 30 * 10 / 300: the same tenth of the run
    assert cfg.user_set == {"max_steps"}
    assert cfg.notes == ["warmup_steps: the default 30 of the default 300 is longer than this 10-step run; using 1"]
    assert (
        parse_config(["--max_steps", "5"], PretrainConfig, str(RECIPE_CONFIGS / "pretrain.yaml")).optim.warmup_steps
        == 0
    )
    # a default that fits is left alone
    assert (
        parse_config(["--max_steps", "40"], PretrainConfig, str(RECIPE_CONFIGS / "pretrain.yaml")).optim.warmup_steps
        == 30
    )


def test_a_warmup_the_user_set_is_refused_when_it_does_not_fit(tmp_path):
    yaml_file = str(RECIPE_CONFIGS / "pretrain.yaml")
    with pytest.raises(ConfigError, match="warmup_steps=30 is longer than max_steps=10"):
        parse_config(["--max_steps", "10", "--warmup_steps", "30"], PretrainConfig, yaml_file)
    own = tmp_path / "mine.yaml"  # the user's own file counts as set by them
    own.write_text("optim:\n  warmup_steps: 30\n")
    with pytest.raises(ConfigError, match="warmup_steps=30 is longer than max_steps=10"):
        parse_config(["--config", str(own), "--max_steps", "10"], PretrainConfig, yaml_file)
    with pytest.raises(ConfigError, match="warmup_steps=30 is longer than max_steps=10"):
        config_from_dict({"max_steps": 10, "warmup_steps": 30})  # a notebook's dict is the user's too


def test_the_codec_defaults_fit_a_six_step_run():
    cfg = parse_config(["--max_steps", "6"], CodecConfig, str(RECIPE_CONFIGS / "codec.yaml"))
    assert cfg.adversarial.discriminator_start_step == 1  # 50 * 6 / 300
    assert cfg.optim.warmup_steps == 0  # 10 * 6 / 300
    assert len(cfg.notes) == 2 and "discriminator_start_step: the default 50" in cfg.notes[1]
    with pytest.raises(ConfigError, match="discriminator_start_step=50 is after max_steps=6"):
        parse_config(
            ["--max_steps", "6", "--discriminator_start_step", "50"], CodecConfig, str(RECIPE_CONFIGS / "codec.yaml")
        )


def test_a_run_length_known_only_from_the_epochs_fits_the_defaults_then():
    cfg = config_from_dict({"max_steps": -1}, defaults={"warmup_steps": 30, "max_steps": 300})
    assert cfg.optim.warmup_steps == 30 and cfg.notes == []  # the length is not known yet
    assert cfg.fit_to_run(20) == [
        "warmup_steps: the default 30 of the default 300 is longer than this 20-step run; using 2"
    ]
    assert cfg.optim.warmup_steps == 2
    # without a default run length to scale by, a tenth of this run
    bare = config_from_dict({"max_steps": -1}, defaults={"warmup_steps": 30})
    bare.fit_to_run(20)
    assert bare.optim.warmup_steps == 2
    user = config_from_dict({"max_steps": -1, "warmup_steps": 30})
    with pytest.raises(ConfigError, match="warmup_steps=30 is longer than max_steps=20"):
        user.fit_to_run(20)


def test_learning_rate_zero_is_accepted_with_a_warning_negative_is_refused():
    cfg = config_from_dict({"learning_rate": 0.0})
    assert cfg.optim.learning_rate == 0.0
    assert any("learning_rate=0" in note for note in cfg.notes)
    with pytest.raises(ConfigError, match="learning_rate=-0.1: must be >= 0"):
        config_from_dict({"learning_rate": -0.1})


def test_user_set_names_exactly_the_flags_given():
    cfg = parse_config(["--learning_rate=1e-4", "--no_eval_on_start", "--seed", "3"], PretrainConfig)
    assert cfg.user_set == {"learning_rate", "eval_on_start", "seed"}
    assert cfg.logging.eval_on_start is False
    assert "user_set" not in cfg.to_flat_dict() and "notes" not in cfg.to_flat_dict()


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1e-3\n   warmup_steps: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 3, column \d+: not valid YAML"):
        parse_config(["--config", str(bad)])
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping of flag names to values, not a list"):
        parse_config(["--config", str(bad)])


# --- one name, one meaning; the model family ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", [PretrainConfig, FinetuneConfig, AlignConfig, CodecConfig])
def test_every_flag_of_a_stage_belongs_to_one_section(stage):
    import dataclasses

    from hf_audio_trainer.config import sections

    names = [f.name for section in sections(stage).values() for f in dataclasses.fields(section)]
    assert len(names) == len(set(names)) and len(names) > 40


def test_a_flag_in_two_sections_of_a_stage_is_an_error_when_the_class_is_defined():
    import dataclasses

    from hf_audio_trainer.config import LossConfig, StageConfig, TrainingConfig, stage_config

    @dataclasses.dataclass
    class MoreLoss:
        label_smoothing: float = 0.0

    with pytest.raises(TypeError, match="flag --label_smoothing is in both its loss and extra sections"):

        @stage_config
        class Broken(StageConfig):
            loss: LossConfig = dataclasses.field(default_factory=LossConfig)
            training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
            extra: MoreLoss = dataclasses.field(default_factory=MoreLoss)


def test_no_stage_config_inherits_another():
    for stage in (PretrainConfig, FinetuneConfig, AlignConfig, CodecConfig):
        assert [c.__name__ for c in stage.__mro__[1:3]] == ["StageConfig", "object"]


def test_the_model_family_is_chosen_by_name_and_a_stage_it_cannot_run_is_refused():
    from hf_audio_trainer import align, pretrain

    assert parse_config([]).model.model_family == "musicgen"
    assert parse_config([], CodecConfig).model.model_family == "encodec_gan"
    valid = r"\['ace_step', 'encodec_gan', 'flow', 'musicgen', 'musicgen_text', 'stable_audio', 'stable_audio_3'\]"
    with pytest.raises(ConfigError, match=rf"model_family='wavenet': choose one of {valid}"):
        parse_config(["--model_family", "wavenet"])
    # refused before any work: nothing is created in the output folder
    with pytest.raises(
        ConfigError, match="the encodec_gan family cannot run the align stage .* --model_family musicgen"
    ):
        align({"model_family": "encodec_gan", "model_name_or_path": "x", "output_dir": "/nonexistent/never"})
    with pytest.raises(ConfigError, match="the encodec_gan family cannot run the pretrain stage"):
        pretrain({"model_family": "encodec_gan", "output_dir": "/nonexistent/never"})


@pytest.mark.parametrize(
    ("config_cls", "overrides", "message"),
    [
        (PretrainConfig, {"curriculum_segments": True}, "--curriculum_segments grows the window with --curriculum"),
        (PretrainConfig, {"max_tokens_per_batch": 0}, "max_tokens_per_batch=0: must be >= 1"),
        (PretrainConfig, {"max_tokens_per_batch": 999, "curriculum": "linear"}, "with a difficulty --curriculum"),
        (AlignConfig, {"max_tokens_per_batch": 999}, "the align stage batches a fixed number of examples"),
        (PretrainConfig, {"segment_seconds": 0.0}, "segment_seconds=0.0: must be > 0"),
        (PretrainConfig, {"streaming": True}, "--streaming needs --dataset_name"),
        (PretrainConfig, {"streaming": True, "dataset_name": "x/y", "curriculum": "linear"}, "a stream does not"),
        (PretrainConfig, {"streaming": True, "dataset_name": "x/y", "max_tokens_per_batch": 99}, "not supported"),
        (FinetuneConfig, {"streaming": True, "dataset_name": "x/y"}, "--streaming is for pretraining"),
    ],
)
def test_data_at_scale_settings_that_cannot_work_are_refused(config_cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides, config_cls)


# --- a stage's config is the shared sections plus the chosen family's -------------------------------------------------


def test_a_stage_config_is_the_shared_sections_the_stages_and_the_familys():
    from hf_audio_trainer.config import for_family, sections

    shared = ["optim", "ema", "training", "logging", "samples", "checkpoint", "hub"]
    composed = {
        (cls, family): list(sections(for_family(cls, family)))
        for cls, family in [
            (PretrainConfig, "musicgen"),
            (PretrainConfig, "flow"),
            (AlignConfig, "musicgen_text"),
            (CodecConfig, "encodec_gan"),
        ]  # fmt: skip
    }
    assert composed[PretrainConfig, "musicgen"] == [*shared, "model", "data", "curriculum", "tokenizer", "loss"]
    assert composed[PretrainConfig, "flow"] == [*shared, "model", "data", "curriculum", "text", "flow"]
    # the tokenizer and LM-loss sections are the training stages' only: align has its own data and objective
    assert composed[AlignConfig, "musicgen_text"] == [*shared, "model", "data", "dpo", "text"]
    assert composed[CodecConfig, "encodec_gan"] == [*shared, "model", "data", "discriminator", "adversarial"]
    # the stage's class builds the composed one for the family it is given, and what it builds pickles by name
    import pickle

    cfg = PretrainConfig()
    assert type(cfg).__name__ == "PretrainConfig__musicgen" and isinstance(cfg, PretrainConfig)
    assert pickle.loads(pickle.dumps(resolve_config({"model_family": "flow"}))).flow.latent_hop_length == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_family": "musicgen", "vae": "x"}, "--vae: the musicgen family does not read them; they are the flow "
         r"family's \(--model_family flow\)"),
        ({"model_family": "flow", "label_smoothing": 0.1}, "--label_smoothing: the flow family does not read them; "
         r"they are the musicgen and musicgen_text families' \(--model_family musicgen\)"),
        ({"model_family": "flow", "tokenizer": "x"}, "--tokenizer: the flow family does not read them"),
        ({"model_family": "musicgen", "text_column": "caption", "guidance_scale": 2.0},
         "--text_column, --guidance_scale: the musicgen family takes no text; use --model_family musicgen_text"),
    ],
)  # fmt: skip
def test_a_flag_of_another_family_is_refused_by_name_from_flags_dicts_and_files(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)
    flags = [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    with pytest.raises(ConfigError, match=message):
        parse_config(flags, PretrainConfig, str(RECIPE_CONFIGS / "pretrain.yaml"))
    own = tmp_path / "mine.yaml"
    own.write_text("".join(f"{k}: {v}\n" for k, v in overrides.items()))
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(own)])
    # a flag no family has is still a typo, with a suggestion
    with pytest.raises(ConfigError, match=r"unknown arguments \['--vea', 'x'\]; did you mean --vae"):
        parse_config(["--model_family", "flow", "--vea", "x"])


def test_a_recipe_default_of_another_family_is_not_the_users_and_is_dropped():
    # finetune.yaml sets the LM loss's label_smoothing, which the flow family does not read: not an error
    cfg = parse_config(["--model_family", "flow", "--model_name_or_path", "x"], FinetuneConfig,
                       str(RECIPE_CONFIGS / "finetune.yaml"))  # fmt: skip
    assert "label_smoothing" not in cfg.to_flat_dict() and cfg.model.model_name_or_path == "x"
    assert cfg.curriculum.high_quality_only is True  # the recipe's other defaults still apply


def test_an_optional_setting_is_switched_off_with_none_and_the_error_says_so(tmp_path):
    # the flow recipe turns FAD on; `none` turns it off from the command line, a dict or a file
    flow_yaml = str(RECIPE_CONFIGS / "pretrain.yaml")
    on = parse_config(["--model_family", "flow"], PretrainConfig, flow_yaml)
    assert on.samples.fad_embedder == "mel"
    off = parse_config(["--model_family", "flow", "--fad_embedder", "none", "--max_difficulty=None"], PretrainConfig,
                       flow_yaml)  # fmt: skip
    assert off.samples.fad_embedder is None and off.curriculum.max_difficulty is None
    assert {"fad_embedder", "max_difficulty"} <= off.user_set
    assert resolve_config({"model_family": "flow", "fad_embedder": "none"}).samples.fad_embedder is None
    own = tmp_path / "mine.yaml"
    own.write_text("samples:\n  fad_embedder: null\nscale_lr: none\n")
    cfg = parse_config(["--config", str(own)])
    assert cfg.samples.fad_embedder is None and cfg.optim.scale_lr is None
    # a required setting keeps its meaning for the word: `none` is a valid curriculum pacing, not a missing one
    assert parse_config(["--curriculum", "none"]).curriculum.curriculum == "none"
    for flag, listed in [("fad_embedder", r"\['clap', 'crepe', 'encodec', 'mel'\] or none"),
                         ("difficulty_method", r"\['acoustic', 'column', 'model_loss'\] or none"),
                         ("scale_lr", "linear, sqrt or none"), ("mixed_precision", r"'bf16'\) or none")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"{flag}='nope': choose .*{listed}"):
            parse_config([f"--{flag}", "nope"])


def test_num_train_epochs_given_replaces_a_default_max_steps():
    cfg = parse_config(["--num_train_epochs", "2"], PretrainConfig, str(RECIPE_CONFIGS / "pretrain.yaml"))
    assert cfg.training.max_steps == -1 and cfg.training.num_train_epochs == 2
    assert cfg.notes == ["num_train_epochs=2: the run is that long (not the default max_steps=300)"]
    both = parse_config(["--num_train_epochs", "2", "--max_steps", "7"], PretrainConfig)
    assert both.training.max_steps == 7  # as in transformers: a max_steps the user gave wins


def test_the_sections_that_shape_a_model_are_named_by_the_sections_themselves():
    flow = resolve_config({"model_family": "flow"})
    assert {"latent_hop_length", "vae", "model_size", "segment_seconds"} <= set(flow.model_settings())
    assert "learning_rate" not in flow.model_settings()
    codec = resolve_config({}, CodecConfig)
    assert {"codec_size", "discriminators", "num_codebooks"} <= set(codec.model_settings())


def test_help_groups_the_flags_by_section_and_shows_the_chosen_familys():
    import subprocess
    import sys

    def help_of(*flags: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), *flags, "--help"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    musicgen, flow = help_of(), help_of("--model_family", "flow")
    assert "flow: The flow family" in flow and "--vae" in flow and "--condition_dropout" in flow
    assert "--vae" not in musicgen and "--condition_dropout" not in musicgen and "--tokenizer" in musicgen
    assert "--tokenizer" not in flow and "--label_smoothing" not in flow
    for title in ("optim: Optimizer", "model: Which model to train", "tokenizer: The discrete audio tokenizer"):
        assert title in musicgen
    assert "--config FILE.yaml" in musicgen


# --- the family comes from the checkpoint ----------------------------------------------------------------------------


def checkpoint_folder(root, name: str, file: str, index: dict):
    import json

    folder = root / name
    folder.mkdir()
    (folder / file).write_text(json.dumps(index))
    return str(folder)


def test_the_model_family_comes_from_the_checkpoints_own_class(tmp_path, monkeypatch):
    flow_index = {"_class_name": "StableAudioPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    folders = {
        "musicgen": checkpoint_folder(tmp_path, "dec", "config.json", {"architectures": ["MusicgenForCausalLM"]}),
        "musicgen_text": checkpoint_folder(
            tmp_path, "comp", "config.json", {"architectures": ["MusicgenForConditionalGeneration"]}
        ),  # fmt: skip
        "flow": checkpoint_folder(tmp_path, "flow", "model_index.json", flow_index),
        "stable_audio": checkpoint_folder(  # Stable Audio Open 1.0's model_index.json
            tmp_path,
            "sao",
            "model_index.json",
            {**flow_index, "scheduler": ["diffusers", "CosineDPMSolverMultistepScheduler"]},
        ),  # fmt: skip
    }
    for family, folder in folders.items():
        assert parse_config(["--model_name_or_path", folder], FinetuneConfig).model.model_family == family
        assert resolve_config({"model_name_or_path": folder}, AlignConfig).model.model_family == family
    # and its own recipe defaults, the command line's and a notebook's alike (Stable Audio Open's training)
    sao = ["--model_name_or_path", folders["stable_audio"]]
    for cfg in (parse_config(sao, FinetuneConfig, str(RECIPE_CONFIGS / "finetune.yaml")),
                resolve_config({"model_name_or_path": folders["stable_audio"]}, FinetuneConfig)):  # fmt: skip
        assert (cfg.optim.learning_rate, cfg.optim.lr_scheduler_type, cfg.ema.ema_decay) == (
            5e-5,
            "inverse_sqrt",
            0.9999,
        )
    codec = checkpoint_folder(tmp_path, "codec", "config.json", {"architectures": ["EncodecModel"]})
    assert parse_config(["--model_name_or_path", codec], CodecConfig).model.model_family == "encodec_gan"
    with pytest.raises(ConfigError, match="the encodec_gan family cannot run the finetune stage"):
        parse_config(["--model_name_or_path", codec], FinetuneConfig)
    # a family given that the checkpoint contradicts is refused, naming both
    with pytest.raises(ConfigError, match=r"--model_family musicgen, but .*/flow is a StableAudioPipeline with a "
                       r"UniPCMultistepScheduler, which the flow family trains; drop --model_family"):  # fmt: skip
        parse_config(["--model_family", "musicgen", "--model_name_or_path", folders["flow"]], FinetuneConfig)
    # a class no family trains, listing what they do train
    other = checkpoint_folder(tmp_path, "ldm", "model_index.json", {"_class_name": "AudioLDM2Pipeline"})
    with pytest.raises(ConfigError, match=r"is a AudioLDM2Pipeline, which no model family trains; the toolkit trains "
                       r"MusicgenForCausalLM \(musicgen\); MusicgenForConditionalGeneration \(musicgen_text\); "
                       r"EncodecModel \(encodec_gan\); StableAudioPipeline sampling with"):  # fmt: skip
        parse_config(["--model_name_or_path", other], FinetuneConfig)
    # a folder that says nothing of its class (a run's checkpoint-N) leaves the choice to the flag or the default
    plain = tmp_path / "checkpoint-4"
    plain.mkdir()
    assert parse_config(["--model_name_or_path", str(plain)], FinetuneConfig).model.model_family == "musicgen"
    # the recipe's default starting model decides too, when it is here: finetune after a flow pretrain
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    checkpoint_folder(tmp_path / "outputs", "pretrain", "model_index.json", flow_index)
    cfg = parse_config([], FinetuneConfig, str(RECIPE_CONFIGS / "finetune.yaml"))
    assert cfg.model.model_family == "flow" and "label_smoothing" not in cfg.to_flat_dict()
    assert resolve_config({}, FinetuneConfig).model.model_family == "flow"
