"""The finetune stage on the real recipe: from a pretrain output folder, on clean rows, full / frozen / LoRA."""

import pytest
from transformers import MusicgenForCausalLM

from hf_audio_trainer import finetune, pretrain
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, quick_run, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tokenizer = fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    out = tmp_path_factory.mktemp("pretrain")
    pretrain(quick_run(tokenizer, out, max_steps=8, overwrite_output_dir=True))
    return out


def settings(out, **overrides):
    run = quick_run(None, out, max_steps=6, eval_steps=6, eval_on_start=True, **overrides)
    del run["tokenizer"]  # the pretrained folder's own tokenizer/ is found by itself
    return run


def test_finetune_starts_from_the_folder_trains_on_clean_rows_and_improves(pretrained, tmp_path, capsys):
    result = finetune({"model_name_or_path": str(pretrained), **settings(tmp_path / "ft", learning_rate=1e-3)})
    printed = capsys.readouterr().out
    clean = int(printed.split(" train / ")[0].split()[-1])
    assert 0 < clean < 60  # of 61 train clips only the clean ones (the default high_quality_only)
    evals = [m["eval/loss"] for m in read_metrics(tmp_path / "ft") if "eval/loss" in m]
    assert evals[-1] < evals[0]  # it improved on the pretrained model's validation loss
    # step 0 evaluates the pretrained model itself: a fresh model would be near log(64) = 4.16 per code
    assert result.global_step == 6 and (tmp_path / "ft" / "tokenizer").is_dir()
    run_config = (tmp_path / "ft" / "run_config.json").read_text()
    assert '"label_smoothing": 0.1' in run_config and '"high_quality_only": true' in run_config


def test_frozen_modules_stay_as_pretrained(pretrained, tmp_path):
    frozen = "model.decoder.layers.0.*"
    finetune({"model_name_or_path": str(pretrained), "freeze_modules": frozen, **settings(tmp_path / "ft")})
    before, after = weights(pretrained), weights(tmp_path / "ft")
    layer0 = [k for k in before if k.startswith("model.decoder.layers.0.")]
    assert layer0 and all((before[k] == after[k]).all() for k in layer0)
    assert not (before["model.decoder.layers.1.fc1.weight"] == after["model.decoder.layers.1.fc1.weight"]).all()


def test_lora_trains_adapters_and_saves_a_merged_plain_model(pretrained, tmp_path, capsys):
    finetune({"model_name_or_path": str(pretrained), "use_peft": True, "lora_r": 4, **settings(tmp_path / "lora")})
    assert "trained)" in capsys.readouterr().out
    after = weights(tmp_path / "lora")
    before = weights(pretrained)
    assert after.keys() == before.keys()  # merged: no lora_A / lora_B, the pretrained model's own names
    assert not (
        before["model.decoder.layers.0.self_attn.q_proj.weight"]
        == after["model.decoder.layers.0.self_attn.q_proj.weight"]
    ).all()  # the adapters were merged into the targets
    assert (before["model.decoder.embed_tokens.0.weight"] == after["model.decoder.embed_tokens.0.weight"]).all()
    MusicgenForCausalLM.from_pretrained(tmp_path / "lora")  # a plain from_pretrained folder


def test_bad_finetune_inputs_fail_before_training(pretrained, tmp_path):
    with pytest.raises(ValueError, match="finetune starts from a pretrained model"):
        finetune(settings(tmp_path / "a"))
    with pytest.raises(ValueError, match="matches no parameter"):
        finetune({"model_name_or_path": str(pretrained), "freeze_modules": "encoder.*", **settings(tmp_path / "b")})
    with pytest.raises(ValueError, match="are not modules of this model"):
        finetune(
            {"model_name_or_path": str(pretrained), "use_peft": True, "lora_target_modules": "query",
             **settings(tmp_path / "c")}
        )  # fmt: skip
