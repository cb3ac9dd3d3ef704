"""What a person trying the toolkit for the first time does: short runs on the defaults, their own folder of audio,
a quick pipeline check at learning rate 0, and mistakes, each of which ends in one line that says what to do."""

import json
import os
import subprocess
import sys

import pytest

from hf_audio_trainer import finetune, pretrain
from hf_audio_trainer.config import FinetuneConfig, parse_config
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.trackers import read_metrics
from tests.e2e.test_bad_input import audio_folder
from tests.helpers import ROOT, as_flags, fit_small_tokenizer, launch, max_abs_diff, quick_run, weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FINETUNE_YAML = str(ROOT / "recipes" / "configs" / "finetune.yaml")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def base_model(tokenizer, tmp_path_factory):
    """A micro model pretrained for 2 steps, saved with its tokenizer: what --model_name_or_path points at."""
    out = tmp_path_factory.mktemp("base")
    pretrain(quick_run(tokenizer, out, model_size="micro", max_steps=2))
    return out


def run_recipe(recipe: str, *flags: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python recipes/<recipe>.py FLAGS`, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *flags]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, recipe: str = "pretrain") -> str:
    """The error line of a run that failed by the user's mistake (status 2, no traceback); returns its text."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{recipe}.py: error: "), done.stderr[-3000:]
    return last.removeprefix(f"{recipe}.py: error: ")


@pytest.mark.slow
@pytest.mark.long
def test_every_recipe_runs_with_only_max_steps(tmp_path):
    # the README's way in: `accelerate launch recipes/<stage>.py`, with nothing but a short length (and the model to
    # start from); defaults that count steps (warm-up 30, the discriminator's start at 50) are fitted, not refused
    out = {stage: tmp_path / stage for stage in ("pretrain", "finetune", "align", "codec")}
    runs = {
        "pretrain": [],
        "finetune": ["--model_name_or_path", str(out["pretrain"])],
        "align": ["--model_name_or_path", str(out["finetune"])],
        "codec": [],
    }
    notes = {
        "pretrain": ["warmup_steps: the default 30 of the default 300 is longer than this 5-step run; using 0"],
        "finetune": ["warmup_steps: the default 10 of the default 150 is longer than this 5-step run; using 0"],
        "align": ["warmup_steps: the default 10 of the default 100 is longer than this 5-step run; using 0"],
        "codec": [
            "warmup_steps: the default 10 of the default 300 is longer than this 5-step run; using 0",
            "discriminator_start_step: the default 50 of the default 300 is longer than this 5-step run; using 0",
        ],
    }
    for stage, flags in runs.items():
        done = launch([f"recipes/{stage}.py", "--max_steps", "5", "--output_dir", str(out[stage]), *flags])
        assert done.returncode == 0, (stage, done.stderr[-3000:])
        for note in notes[stage]:
            assert note in done.stdout.splitlines(), (stage, done.stdout[-2000:])
        assert (out[stage] / "model.safetensors").is_file(), stage
        assert max(m["step"] for m in read_metrics(out[stage])) == 5, stage
        assert json.loads((out[stage] / "run_config.json").read_text())["max_steps"] == 5


def test_finetune_on_a_folder_without_quality_labels_uses_every_clip(base_model, tmp_path, capsys):
    folder = audio_folder(tmp_path / "my_clips", count=12)  # the user's own wavs: no 'quality' column
    flags = ["--model_name_or_path", str(base_model), "--dataset_name", str(folder), "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--report_to", "none"]  # fmt: skip
    result = finetune(parse_config([*flags, "--output_dir", str(tmp_path / "ft")], FinetuneConfig, FINETUNE_YAML))
    assert result.global_step == 2
    printed = capsys.readouterr().out
    assert "high_quality_only: the dataset has no 'quality' column, so every training row is used" in printed
    assert "11 train / 1 validation clips" in printed  # nothing was filtered away
    # asked for explicitly, the selection this data cannot support is an error
    asked = parse_config([*flags, "--output_dir", str(tmp_path / "ft2"), "--high_quality_only", "true"],
                         FinetuneConfig, FINETUNE_YAML)  # fmt: skip
    with pytest.raises(ConfigError, match=r"--high_quality_only reads a 'quality' column, which the dataset lacks"):
        finetune(asked)


def test_learning_rate_zero_exports_the_model_it_loaded_bit_for_bit(base_model, tmp_path, capsys):
    flags = ["--model_name_or_path", str(base_model), "--learning_rate", "0", "--max_steps", "3",
             "--synthetic_num_clips", "64", "--output_dir", str(tmp_path / "ft"), "--report_to", "none"]  # fmt: skip
    finetune(parse_config(flags, FinetuneConfig, FINETUNE_YAML))
    assert max_abs_diff(weights(base_model), weights(tmp_path / "ft")) == 0.0
    assert "learning_rate=0: the weights will not change" in capsys.readouterr().out


# --- mistakes end in one line, `<recipe>.py: error: <what and the fix>`, status 2 ---------------------------------


def test_a_yaml_file_with_a_syntax_error(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("training:\n  max_steps: 10\n  output_dir: [outputs/x\n")
    message = one_line_error(run_recipe("pretrain", "--config", str(bad)))
    assert message.startswith(f"config file {bad}, line 4, column 1: not valid YAML")


def test_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = one_line_error(run_recipe("pretrain", "--output_dir", str(tmp_path / "notes.txt")))
    assert message == f"--output_dir {tmp_path / 'notes.txt'} is a file, not a folder; pass the path of a folder " \
        "(new or existing)"  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resuming_with_another_model_size_names_the_setting(tokenizer, tmp_path):
    run = quick_run(tokenizer, tmp_path / "run", model_size="micro", max_steps=2, save_steps=2)
    pretrain(run)
    flags = as_flags({**run, "model_size": "tiny", "max_steps": 4})
    message = one_line_error(run_recipe("pretrain", *flags, "--resume_from_checkpoint", "latest"))
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoint-2'} does not fit this run's model: ")
    assert "model_size='tiny' here, 'micro' in the checkpoint; resume with the checkpoint's settings" in message


def test_the_disk_filling_up_during_a_checkpoint(tokenizer, tmp_path):
    out = tmp_path / "run"
    flags = as_flags(quick_run(tokenizer, out, model_size="micro", max_steps=6, save_steps=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = ROOT / "tests" / "e2e" / "fill_disk_at_checkpoint.py"
    done = subprocess.run([sys.executable, str(script), "4", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    message = one_line_error(done, recipe="fill_disk_at_checkpoint")
    assert message.startswith(f"could not write checkpoint-4 in {out}: the disk refused a write")
    assert "unexpected pos" in message  # what torch's zip writer says when the disk refuses it
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in message
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no .tmp-checkpoint-4
    # and it is: the run continues from it once there is room
    resumed = run_recipe("pretrain", *flags, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in resumed.stdout


def test_latest_falls_back_past_a_corrupt_state_file_and_ends_like_a_straight_run(tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(quick_run(tokenizer, out, model_size="micro", max_steps=4, save_steps=2))
    straight = weights(out)
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "files": {"model.saf')
    capsys.readouterr()
    result = pretrain(
        quick_run(tokenizer, out, model_size="micro", max_steps=4, save_steps=2, resume_from_checkpoint="latest")
    )
    printed = capsys.readouterr().out
    assert f"skipping checkpoint-4: checkpoint {out / 'checkpoint-4'} is damaged: trainer_state.json cannot be read" \
        in printed  # fmt: skip
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in printed
    assert result.global_step == 4 and max_abs_diff(straight, weights(out)) < 1e-6


def test_under_accelerate_launch_quiet_the_error_is_the_last_line(tmp_path):
    # accelerate's launcher re-raises a failed worker as its own CalledProcessError unless -q; with -q it exits 1
    done = launch(["-q", "recipes/pretrain.py", "--learning_rate", "-1", "--output_dir", str(tmp_path / "out")])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "pretrain.py: error: learning_rate=-1.0: must be >= 0"
