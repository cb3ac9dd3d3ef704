"""The real recipe under `accelerate launch`, as a user runs it: what it writes, and resuming with `latest`."""

import json

import pytest
from transformers import MusicgenForCausalLM

from hf_audio_trainer.codecs import load_audio_tokenizer
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import as_flags, fit_small_tokenizer, launch, quick_run

pytestmark = pytest.mark.slow


def test_launch_writes_a_loadable_model_checkpoints_and_logs_then_resumes_latest(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "run"
    settings = quick_run(
        tokenizer,
        out,
        max_steps=4,
        save_steps=2,
        save_total_limit=1,
        eval_steps=2,
        eval_on_start=True,
        report_to="tensorboard",
        per_device_train_batch_size=4,
    )
    done = launch(["--num_processes", "1", "recipes/pretrain.py", *as_flags(settings)])
    assert done.returncode == 0, done.stderr[-3000:]

    # the final model is a from_pretrained folder with safetensors weights, and the tokenizer is next to it
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = MusicgenForCausalLM.from_pretrained(out)
    codec = load_audio_tokenizer(str(out / "tokenizer"))
    assert model.config.num_codebooks == codec.num_codebooks == 2
    assert model.config.vocab_size == codec.codebook_size == 64

    # save_total_limit=1 keeps only the newest checkpoint; it holds everything needed to resume
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    ckpt = out / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["num_processes"] == 1
    assert state["sampler"] == {"epoch": 0, "position": 16, "seed": 0}
    assert not list(out.glob(".tmp-*"))

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 2, 4]
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        assert m["train/grad_norm"] > 0 and m["train/tokens_per_second"] > 0
        assert m["train/audio_seconds_per_second"] > 0 and m["train/samples_per_second"] > 0
    assert train[0]["train/learning_rate"] == pytest.approx(2e-3 / 2)  # warm-up step 1 of 2
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote nothing"

    # a second launch continues the same output folder from its latest checkpoint
    settings.update(max_steps=6, resume_from_checkpoint="latest")
    again = launch(["--num_processes", "1", "recipes/pretrain.py", *as_flags(settings)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resumed from" in again.stdout and "checkpoint-4" in again.stdout
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]


def test_launch_refuses_to_mix_runs_and_names_the_fix(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    done = launch(["--num_processes", "1", "recipes/pretrain.py", *as_flags(quick_run(tokenizer, out, max_steps=2))])
    assert done.returncode != 0
    assert "--resume_from_checkpoint latest" in done.stderr and "--overwrite_output_dir" in done.stderr
