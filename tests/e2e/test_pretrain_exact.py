"""The two promises of the loop, on the real recipe: exact accumulation and exact resume."""

import math

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, max_abs_diff, quick_run, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def losses(output_dir, first=1):
    return {m["step"]: m["train/loss"] for m in read_metrics(output_dir) if "train/loss" in m and m["step"] >= first}


def test_accumulation_2x4_equals_8x1_on_variable_length_clips(tokenizer, tmp_path):
    small = pretrain(
        quick_run(
            tokenizer, tmp_path / "2x4", max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=4
        )
    )
    big = pretrain(
        quick_run(
            tokenizer, tmp_path / "8x1", max_steps=5, per_device_train_batch_size=8, gradient_accumulation_steps=1
        )
    )
    assert small.global_step == big.global_step == 5
    diff = max_abs_diff(weights(tmp_path / "2x4"), weights(tmp_path / "8x1"))
    assert diff < 1e-5, diff
    a, b = losses(tmp_path / "2x4"), losses(tmp_path / "8x1")
    assert a.keys() == b.keys() == {1, 2, 3, 4, 5}
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert a[5] < a[1]  # it did learn


def test_resume_equals_straight_run_with_dropout_on(tokenizer, tmp_path):
    # dropout on, so the RNG states must be restored too
    settings = dict(
        max_steps=6,
        save_steps=3,
        dropout=0.1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        eval_steps=3,
        ema=True,  # the average must resume exactly too
        ema_decay=0.5,
    )
    straight = pretrain(quick_run(tokenizer, tmp_path / "straight", **settings))
    assert (tmp_path / "straight" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = pretrain(
        quick_run(
            tokenizer,
            tmp_path / "resumed",
            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"),
            **settings,
        )
    )
    assert resumed.global_step == straight.global_step == 6
    diff = max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert diff < 1e-6, diff
    before, after = losses(tmp_path / "straight", first=4), losses(tmp_path / "resumed")
    assert before.keys() == after.keys() == {4, 5, 6}
    assert all(abs(before[s] - after[s]) < 1e-6 for s in before), (before, after)
    assert resumed.metrics["eval/loss"] == pytest.approx(straight.metrics["eval/loss"], abs=1e-6)
    assert resumed.metrics["eval/loss_ema"] == pytest.approx(straight.metrics["eval/loss_ema"], abs=1e-6)
    assert max_abs_diff(weights(tmp_path / "straight" / "ema"), weights(tmp_path / "resumed" / "ema")) < 1e-6


def test_bf16_autocast_runs_on_cpu_and_stays_close_to_fp32(tokenizer, tmp_path):
    fp32 = pretrain(quick_run(tokenizer, tmp_path / "fp32", max_steps=3, mixed_precision="no"))
    bf16 = pretrain(quick_run(tokenizer, tmp_path / "bf16", max_steps=3, mixed_precision="bf16"))
    assert bf16.metrics["train/loss"] == pytest.approx(fp32.metrics["train/loss"], rel=0.02)
    assert 0 < max_abs_diff(weights(tmp_path / "fp32"), weights(tmp_path / "bf16")) < 0.05  # really ran in bf16


def test_continue_from_a_finished_run_folder(tokenizer, tmp_path):
    first = pretrain(quick_run(tokenizer, tmp_path / "first", max_steps=3))
    # the output folder is a from_pretrained model with its tokenizer inside: both flags take the folder
    second = pretrain(
        quick_run(first.output_dir, tmp_path / "second", max_steps=2, model_name_or_path=first.output_dir)
    )
    assert second.global_step == 2
    assert 0 < max_abs_diff(weights(tmp_path / "first"), weights(tmp_path / "second"))
    assert second.metrics["train/loss"] < 4.0  # started from the trained weights, not from ln(64) = 4.16


def test_num_train_epochs_sets_the_step_count(tokenizer, tmp_path):
    # 64 clips, 5% held out -> 60 train clips; a global batch of 8 gives 7 full steps per epoch
    result = pretrain(
        quick_run(tokenizer, tmp_path / "epochs", max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8)
    )
    assert result.global_step == 14
    assert max(m["step"] for m in read_metrics(tmp_path / "epochs")) == 14


def test_ema_is_evaluated_and_exported_as_a_loadable_model(tokenizer, tmp_path):
    from transformers import MusicgenForCausalLM

    result = pretrain(
        quick_run(tokenizer, tmp_path / "ema", max_steps=4, eval_steps=4, ema=True, ema_decay=0.9, final_model="ema")
    )
    assert {"eval/loss", "eval/loss_ema"} <= result.metrics.keys()
    assert result.metrics["eval/loss_ema"] != result.metrics["eval/loss"]
    ema_weights = weights(tmp_path / "ema" / "ema")
    assert max_abs_diff(weights(tmp_path / "ema"), ema_weights) == 0  # --final_model ema: the top level is the EMA
    assert MusicgenForCausalLM.from_pretrained(tmp_path / "ema" / "ema").config.num_codebooks == 2
    assert (tmp_path / "ema" / "ema" / "tokenizer" / "tokenizer_config.json").is_file()
    raw = pretrain(quick_run(tokenizer, tmp_path / "raw", max_steps=4, ema=True, ema_decay=0.9))
    assert raw.global_step == 4
    assert max_abs_diff(weights(tmp_path / "raw" / "ema"), ema_weights) == 0  # same run, same average
    assert max_abs_diff(weights(tmp_path / "raw"), ema_weights) > 0  # but the top level holds the raw weights


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_best_checkpoint_is_the_best_evaluated_step(tokenizer, tmp_path, greater_is_better):
    import json

    out = tmp_path / "run"
    pretrain(
        quick_run(
            tokenizer,
            out,
            max_steps=5,
            eval_steps=1,
            save_steps=1,
            save_total_limit=1,
            greater_is_better=greater_is_better,
            learning_rate=5e-3,
        )
    )
    evals = {m["step"]: m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m and m["step"] > 0}
    pick = max if greater_is_better else min
    expected = pick(evals, key=evals.get)
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    assert state["global_step"] == expected, evals
    assert state["best"] == {"step": expected, "value": evals[expected], "metric": "eval/loss"}
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-5"]  # rotation never touches best/
    assert (out / "best" / "model.safetensors").is_file()


def test_scale_lr_and_label_smoothing_flags_reach_the_run(tokenizer, tmp_path, capsys):
    result = pretrain(
        quick_run(
            tokenizer,
            tmp_path / "scaled",
            max_steps=2,
            per_device_train_batch_size=8,
            scale_lr="linear",
            base_batch_size=4,
            label_smoothing=0.1,
        )
    )
    assert "learning rate 0.002 tuned for a batch of 4 -> 0.004" in capsys.readouterr().out
    first = next(m for m in read_metrics(tmp_path / "scaled") if "train/learning_rate" in m)
    assert first["train/learning_rate"] == pytest.approx(0.004 / 2)  # warm-up step 1 of 2 of the scaled lr
    assert result.global_step == 2


@pytest.mark.parametrize("optim", ["adam", "adafactor", "lion", "lamb", "lars"])
def test_each_optimizer_trains_the_recipe(tokenizer, tmp_path, optim):
    result = pretrain(quick_run(tokenizer, tmp_path / optim, max_steps=2, optim=optim, learning_rate=1e-3))
    assert result.global_step == 2 and math.isfinite(result.metrics["train/loss"])
    assert (tmp_path / optim / "model.safetensors").is_file()


@pytest.mark.parametrize("optim", ["sophia", "muon"])
def test_sophia_and_muon_resume_exactly(tokenizer, tmp_path, optim):
    # Sophia refreshes its Hessian at steps 0, 2, 4: the resumed run must redo the step-4 pass identically (its
    # probes come from the restored RNG); Muon's two inner optimizers must both come back
    settings = dict(max_steps=6, save_steps=3, optim=optim, hessian_update_period=2, dropout=0.1)
    straight = pretrain(quick_run(tokenizer, tmp_path / "straight", **settings))
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    resumed = pretrain(quick_run(tokenizer, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **settings))
    assert straight.global_step == resumed.global_step == 6
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
    first, last = losses(tmp_path / "straight")[1], losses(tmp_path / "straight")[6]
    assert last < first  # and it learns
